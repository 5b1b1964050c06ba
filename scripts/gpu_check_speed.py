"""Part b of scripts/gpu_check.py: seconds per step, tokens per second, peak memory and MFU of one training step
of every mode, at real shapes (a Qwen2.5-0.5B-shaped student, a Qwen2.5-7B-shaped teacher, random weights).

Every mode trains every position of ``batch`` rows of ``seq`` random tokens, in bf16 weights under the Trainer's
``bf16=True`` autocast (the hand-written loops open the same autocast), with fused AdamW (the Trainer's default),
no gradient clipping, no gradient checkpointing, PyTorch's default matmul precision (float32 products in full
float32, no TF32: what a user gets):

- ``floor``: the teacher's forward with its head (logits computed, then dropped), the student's forward and
  backward with the model's own cross-entropy (``labels=``: transformers upcasts the logits to float32), AdamW.
  Its worker also finds the largest batch that fits (:func:`largest_batch`); the other modes run at that batch.
- ``floor_fused``: the same with the student's CE a fused linear cross-entropy that never builds its logits:
  Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` where it imports (CUDA and triton), else llmkd's engine at
  kd_ratio 0 (the teacher's head then runs chunk by chunk inside the engine instead of in its forward).
- ``kd``: llmkd ``DistillTrainer`` (forward KL, kd_ratio 0.5); ``taid``: ``TAIDTrainer`` (kd_ratio 0.5);
  ``cache``: ``DistillTrainer`` from a top-64 cache written first by the same teacher (writing not timed; the
  teacher is freed before training).
- ``gkd``: TRL's ``GKDTrainer`` off-policy forward KL (``lmbda=0``, ``beta=0``) over full logits;
  ``distillation``: TRL's ``DistillationTrainer`` (``beta=0``: forward KL, its chunked head + loss kernel). TRL
  1.16 ships it on-policy only; here its private ``_generate_single_turn`` returns each row's completion from the
  dataset, so the measured step is TRL's loss and training step on the same tokens as the other modes.
  Both need equal vocabularies: their teacher's head has the student's 151,936 rows (the others 152,064).

A mode that runs out of memory at the floor's batch is retried at half the batch, in the same process (the table
says so); tokens per second compare across batches.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from types import SimpleNamespace

import gpu_check_common as common
from bench_step import _common, _rows, _tokenizer  # the step benchmark's token rows, tokenizer and settings
from gpu_check_common import log

MODES = ("floor", "floor_fused", "kd", "taid", "cache", "gkd", "distillation")
PROMPT_TOKENS = 8  # TRL's trainers take a prompt and a completion: every row is 8 prompt tokens + the rest


class Setup:
    """The models, tokenizer and token rows of one mode's process.

    ``rows``: ``count`` lists of ``seq`` token ids; ``student`` / ``teacher``: causal LMs on ``device`` in
    ``dtype``; ``vocab``: the ids both heads score (the tokenizer's size is below it).
    """

    def __init__(self, shapes: dict, device, dtype, equal_vocab: bool):
        self.shapes, self.device, self.dtype = shapes, device, dtype
        self.seq, self.warmup, self.steps = shapes["seq"], shapes["warmup"], shapes["steps"]
        teacher_config = dict(shapes["teacher"])
        if equal_vocab:
            teacher_config["vocab_size"] = shapes["student"]["vocab_size"]
        log(f"building the student {shapes['student']} and the teacher {teacher_config} on {device} in {dtype}")
        self.student = common.build_causal_lm(shapes["student"], dtype, device, seed=1, seq=self.seq)
        self.teacher = common.build_causal_lm(teacher_config, dtype, device, seed=2, seq=self.seq).eval()
        self.teacher.requires_grad_(False)
        self.teacher_params = common.matmul_parameters(self.teacher)
        self.teacher_config = self.teacher.config
        self.tokenizer = _tokenizer(shapes["tokenizer_size"])
        self.vocab = min(shapes["student"]["vocab_size"], teacher_config["vocab_size"])

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def rows(self, batch: int) -> list[list[int]]:
        return _rows(self.shapes["tokenizer_size"], self.seq, batch * self.total_steps)

    def batch_ids(self, rows: list[list[int]], batch: int, step: int):
        """``(batch, seq)`` int64 token ids of step ``step``, on the device."""
        import torch

        return torch.tensor(rows[step * batch:(step + 1) * batch], device=self.device)

    def trainer_settings(self, batch: int, output_dir: str) -> dict:
        """The TrainingArguments fields every Trainer-based mode shares (bench_step's, plus bf16)."""
        import torch

        settings = _common(SimpleNamespace(batch=batch, total_steps=self.total_steps), output_dir)
        return dict(settings, bf16=self.dtype == torch.bfloat16, gradient_checkpointing=False,
                    use_cpu=self.device.type == "cpu")  # transformers refuses bf16 on the CPU without it


# ------------------------------------------------------------------------------------------------ the floors
def floor_step(setup: Setup, ids, optimizer) -> None:
    """One floor step on ``ids`` ``(B, S)``: teacher forward with its head, student CE forward + backward, AdamW."""
    import torch

    with common.autocast(setup.device, setup.dtype):
        with torch.no_grad():
            setup.teacher(input_ids=ids, use_cache=False).logits  # computed, then dropped
        loss = setup.student(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fused_ce_loss(setup: Setup):
    """``(name, loss(ids (B, S)) -> scalar)``: the stronger floor's forward: the teacher's forward and the
    student's CE through a fused linear cross-entropy (Liger-Kernel's where it imports, else llmkd's engine)."""
    import torch

    from llmkd.heads import intercept_head
    from llmkd.losses import chunked_distillation_loss, get_divergence

    student_body = setup.student.get_decoder()
    student_head = setup.student.get_output_embeddings()
    reason = "no CUDA device"
    if setup.device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            probe = torch.randn(8, 16, device=setup.device, dtype=setup.dtype, requires_grad=True)
            liger(torch.randn(32, 16, device=setup.device, dtype=setup.dtype), probe,
                  torch.arange(8, device=setup.device)).backward()  # its kernels compile and run here, or not at all

            def liger_loss(ids):
                with torch.no_grad():
                    setup.teacher(input_ids=ids, use_cache=False).logits  # the floor's teacher, head included
                hidden = student_body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                return liger(student_head.weight, hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1))

            return "Liger-Kernel LigerFusedLinearCrossEntropyLoss", liger_loss
        except Exception as error:  # noqa: BLE001 - reported in the table
            reason = f"Liger-Kernel did not run: {type(error).__name__}: {error}"[:160]
    log(f"stronger floor: llmkd's engine at kd_ratio 0 ({reason})")
    teacher_head = setup.teacher.get_output_embeddings()
    fkl = get_divergence("fkl")

    def llmkd_loss(ids):
        with torch.no_grad(), intercept_head(setup.teacher, lambda hidden_states: hidden_states):
            teacher_hidden = setup.teacher(input_ids=ids, use_cache=False).logits[:, :-1]
        hidden = student_body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        width = hidden.shape[-1]
        return chunked_distillation_loss(
            hidden.reshape(-1, width), student_head.weight, teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            teacher_head.weight, ids[:, 1:].reshape(-1), fkl, kd_weight=0.0, ce_weight=1.0,
            vocab_size=setup.vocab).loss

    return f"llmkd engine at kd_ratio 0 ({reason})", llmkd_loss


def run_loop(setup: Setup, batch: int, step_fn) -> dict:
    """``warmup + steps`` steps of ``step_fn(ids, optimizer)`` at ``batch``, timed by a :class:`StepClock`."""
    import torch

    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-4, fused=True)
    rows = setup.rows(batch)
    clock = common.StepClock(setup.device, setup.warmup)
    for step in range(setup.total_steps):
        ids = setup.batch_ids(rows, batch, step)
        clock.begin(step)
        step_fn(ids, optimizer)
        clock.end(step)
    return {"clock": clock}


def floor(setup: Setup, batch: int) -> dict:
    return run_loop(setup, batch, lambda ids, optimizer: floor_step(setup, ids, optimizer))


def floor_fused(setup: Setup, batch: int) -> dict:
    name, loss_fn = fused_ce_loss(setup)

    def step(ids, optimizer):
        with common.autocast(setup.device, setup.dtype):
            loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return dict(run_loop(setup, batch, step), implementation=name)


def largest_batch(try_batch, capacity_bytes: float | None, max_batch: int) -> tuple[int, list[str]]:
    """The largest batch at most ``max_batch`` whose step ``try_batch(b) -> peak bytes`` runs without running out
    of memory, with few tries: batches 1 and 2 give the memory per row, the prediction for ``capacity_bytes`` (None:
    unknown, then ``max_batch``) is tried, and on out-of-memory the batch shrinks by an eighth (at least 1) until a
    step runs. Returns (batch, what each try gave)."""
    notes = []
    peaks = {}
    for b in (1, 2)[:max_batch]:
        peaks[b] = try_batch(b)
        notes.append(f"b={b}: {peaks[b] / 2**30:.1f} GiB")
    if max_batch <= 2:
        return min(max_batch, 2), notes
    per_row = max(peaks[2] - peaks[1], 1.0)
    predicted = max_batch if capacity_bytes is None else 2 + int((capacity_bytes - peaks[2]) // per_row)
    batch = min(max(predicted, 2), max_batch)
    while batch > 2:
        try:
            peak = try_batch(batch)
            notes.append(f"b={batch}: {peak / 2**30:.1f} GiB")
            return batch, notes
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are expected
            if not common.is_out_of_memory(error):
                raise
            notes.append(f"b={batch}: out of memory")
        batch -= max(1, batch // 8)
    return 2, notes


def search_floor_batch(setup: Setup) -> tuple[int, list[str]]:
    """The floor's largest batch (:func:`largest_batch` on floor steps, 92% of the device's memory usable)."""
    import torch

    optimizer = torch.optim.AdamW(setup.student.parameters(), lr=1e-4, fused=True)
    rows = setup.rows(setup.shapes["max_batch"])

    def try_batch(batch: int) -> float:
        common.release_memory(setup.device)
        common.reset_peak(setup.device)
        try:
            floor_step(setup, setup.batch_ids(rows[:batch], batch, 0), optimizer)
        except Exception:
            optimizer.zero_grad(set_to_none=True)
            raise
        common.synchronize(setup.device)
        log(f"  floor fits batch {batch}")
        return common.peak_memory_gib(setup.device) * 2**30

    capacity = None
    if setup.device.type == "cuda":
        capacity = 0.92 * torch.cuda.mem_get_info(setup.device)[1]
    return largest_batch(try_batch, capacity, setup.shapes["max_batch"])


# ------------------------------------------------------------------------------------------- llmkd trainers
def llmkd_trainer(setup: Setup, batch: int, mode: str) -> dict:
    """``kd``, ``taid`` or ``cache``: llmkd's trainers (kd_ratio 0.5) for ``warmup + steps`` steps."""
    from datasets import Dataset

    from llmkd import DistillConfig, DistillTrainer, TAIDConfig, TAIDTrainer

    rows = setup.rows(batch)
    data = Dataset.from_list([{"input_ids": row, "labels": row} for row in rows])
    output_dir = tempfile.mkdtemp(prefix=f"llmkd_gpu_check_{mode}_")
    settings = dict(setup.trainer_settings(batch, output_dir), max_length=setup.seq, verify_logit_head=False,
                    kd_ratio=0.5)
    clock = common.StepClock(setup.device, setup.warmup)
    if mode == "cache":
        cache_dir = write_cache(setup, data, batch, output_dir)
        trainer = DistillTrainer(model=setup.student, args=DistillConfig(**settings, teacher_cache=cache_dir),
                                 train_dataset=data, processing_class=setup.tokenizer, callbacks=[clock.callback()])
    else:
        config_class, trainer_class = (DistillConfig, DistillTrainer) if mode == "kd" else (TAIDConfig, TAIDTrainer)
        trainer = trainer_class(model=setup.student, teacher_model=setup.teacher, args=config_class(**settings),
                                train_dataset=data, processing_class=setup.tokenizer, callbacks=[clock.callback()])
    trainer.train()
    return {"clock": clock}


def write_cache(setup: Setup, data, batch: int, output_dir: str) -> str:
    """A top-64 cache of ``data`` by the setup's teacher, which is then freed (the cache replaces it)."""
    from llmkd.cache import write_teacher_cache
    from llmkd.data import prepare_dataset

    cache_dir = os.path.join(output_dir, "cache")
    log(f"writing the top-64 teacher cache of {len(data)} rows (not timed)")
    prepared = prepare_dataset(data, setup.tokenizer, max_length=setup.seq)
    write_teacher_cache(setup.teacher, prepared, setup.tokenizer, cache_dir, top_k=64, temperature=1.0,
                        shard_rows=len(data), batch_size=batch, vocab_size=setup.vocab,
                        teacher_name="gpu-check-teacher", progress=False)
    setup.teacher = None  # the teacher's memory is not part of a cache step
    common.release_memory(setup.device)
    return cache_dir


# ------------------------------------------------------------------------------------------------ TRL trainers
def prompt_and_completion(row: list[int]) -> tuple[str, str]:
    """A row as TRL's text: its first PROMPT_TOKENS words and the rest (the tokenizer maps word ``t<i>`` to id i)."""
    words = [f"t{i}" for i in row]
    return " ".join(words[:PROMPT_TOKENS]), " ".join(words[PROMPT_TOKENS:])


def gkd(setup: Setup, batch: int) -> dict:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    messages = []
    for row in setup.rows(batch):
        prompt, completion = prompt_and_completion(row)
        messages.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": completion}]})
    clock = common.StepClock(setup.device, setup.warmup)
    config = GKDConfig(**setup.trainer_settings(batch, tempfile.mkdtemp(prefix="llmkd_gpu_check_gkd_")),
                       lmbda=0.0, beta=0.0, temperature=1.0, max_length=setup.seq + 8, disable_dropout=True)
    trainer = GKDTrainer(model=setup.student, teacher_model=setup.teacher, args=config,
                         train_dataset=Dataset.from_list(messages), processing_class=setup.tokenizer,
                         callbacks=[clock.callback()])
    trainer.train()
    return {"clock": clock}


def dataset_completions_trainer(completions: dict):
    """TRL's DistillationTrainer whose completions come from ``completions`` (prompt ids -> completion ids)
    instead of the student's sampling: only the private ``_generate_single_turn`` is replaced."""
    from trl import DistillationTrainer

    class DatasetCompletionsDistillationTrainer(DistillationTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            return [list(completions[tuple(ids)]) for ids in prompt_ids]

    return DatasetCompletionsDistillationTrainer


def distillation(setup: Setup, batch: int) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig

    rows = setup.rows(batch)
    completions = {tuple(row[:PROMPT_TOKENS]): row[PROMPT_TOKENS:] for row in rows}
    data = Dataset.from_list([{"prompt": prompt_and_completion(row)[0]} for row in rows])
    clock = common.StepClock(setup.device, setup.warmup)
    config = DistillationConfig(
        **setup.trainer_settings(batch, tempfile.mkdtemp(prefix="llmkd_gpu_check_distillation_")), beta=0.0,
        temperature=1.0, max_completion_length=setup.seq - PROMPT_TOKENS, disable_dropout=True,
        shuffle_dataset=False)
    trainer = dataset_completions_trainer(completions)(
        model=setup.student, teacher_model=setup.teacher, args=config, train_dataset=data,
        processing_class=setup.tokenizer, callbacks=[clock.callback()])
    trainer.train()
    return {"clock": clock}


RUNNERS = {"floor": floor, "floor_fused": floor_fused, "gkd": gkd, "distillation": distillation,
           **{mode: (lambda setup, batch, mode=mode: llmkd_trainer(setup, batch, mode))
              for mode in ("kd", "taid", "cache")}}


# --------------------------------------------------------------------------------------------- measuring
def summarize(setup: Setup, mode: str, batch: int, outcome: dict, peak: float | None) -> dict:
    """The table row of a finished mode: median seconds per measured step, tokens/s, peak memory, MFU."""
    clock = outcome["clock"]
    seconds = statistics.median(clock.measured() or clock.times)
    tokens = batch * setup.seq
    flops = common.step_flops(setup.student, setup.teacher_config, setup.teacher_params, tokens, setup.seq)
    row = {"mode": mode, "batch": batch, "sec_per_step": seconds, "tokens_per_s": tokens / seconds,
           "peak_gib": clock.peak_gib, "steps": len(clock.measured()), "flops_per_step": flops,
           "mfu": None if peak is None else flops / seconds / peak}
    if "implementation" in outcome:
        row["implementation"] = outcome["implementation"]
    if mode in ("kd", "taid"):  # the engine's chunk buffers: five (rows, V) float32 tensors at most
        from llmkd.losses.engine import auto_chunk_size

        row["chunk_buffers_gib"] = 5 * auto_chunk_size(setup.vocab) * setup.vocab * 4 / 2**30
    return row


def measure(mode: str, shapes: dict, device, batch: int | None) -> dict:
    """One mode's row: at ``batch`` (the floor: None, found by :func:`search_floor_batch`), halved on out-of-memory
    until it runs."""
    import torch

    setup = Setup(shapes, device, torch.bfloat16, equal_vocab=mode in ("gkd", "distillation"))
    peak, gpu = common.peak_flops(device)
    notes = []
    if batch is None and mode == "floor":
        batch, notes = search_floor_batch(setup)
        log(f"floor: largest batch {batch} ({'; '.join(notes)})")
    elif batch is None:  # the floor failed: start from the largest batch allowed
        batch = shapes["max_batch"]
    while True:
        log(f"{mode}: batch {batch}, {setup.warmup} warm-up + {setup.steps} measured steps")
        try:
            outcome = RUNNERS[mode](setup, batch)
            break
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are retried
            if not common.is_out_of_memory(error) or batch == 1:
                raise
            message = f"out of memory at batch {batch}"
        notes.append(message)  # outside the except block: the error's frames (and tensors) are released
        log(f"{mode}: {message}; retrying at {batch // 2}")
        setup.student.zero_grad(set_to_none=True)
        common.release_memory(device)
        batch //= 2
    row = summarize(setup, mode, batch, outcome, peak)
    row.update(notes=notes, gpu=gpu)
    log(f"{mode}: {row['sec_per_step']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s, "
        f"{row['peak_gib']:.1f} GiB")
    return row


def run_modes(modes: list[str], shape_name: str, smoke: bool, batch: int | None):
    """The worker of ``gpu_check.py --worker speed``: yields each mode's row when it is done (a failure is a row
    too)."""
    import traceback

    shapes = common.SHAPES[shape_name]
    device = common.pick_device(smoke)
    for mode in modes:
        try:
            row = measure(mode, shapes, device, batch)
        except Exception as error:  # noqa: BLE001 - a failed mode is reported, the others still run
            traceback.print_exc()
            row = {"mode": mode, "failed": f"{type(error).__name__}: {error}"[:300]}
        if mode == "floor" and "batch" in row:
            batch = row["batch"]
        yield row
        with contextlib.suppress(Exception):
            common.release_memory(device)
