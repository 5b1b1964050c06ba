"""Runs of the exact-resume test (tests/test_resume.py), one trainer at a time on tiny models (CPU, 1 thread).

    python tests/resume_worker.py ROOT CASE [CASE ...]

For each case, three runs, each in a process forked from this one after the imports (so each starts clean, and
the imports are paid once):

- ``whole``: MAX_STEPS steps, a checkpoint every SAVE_STEPS;
- ``killed``: the same run, which SIGKILLs itself as soon as checkpoint-KILL_AT is written (after every callback's
  ``on_save``, so that method state such as TAID's schedule is in it);
- ``resumed``: resumes from the killed run's checkpoint-KILL_AT, in the killed run's output_dir, to the end.

Each run writes under ``ROOT/CASE/RUN/``: ``losses.jsonl`` (``[global step, micro-batch loss]`` per line, flushed at
once, so a killed run leaves its losses too), ``states.jsonl`` (the method state after each optimizer step), and,
when it finishes, ``weights.pt`` (the student's state dict), ``final.json`` (the method state and the log history).
``ROOT/status.json`` gives each run's exit: ``{"exit": code}`` or ``{"signal": number}`` (and for the killed run,
the checkpoints it left).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch
from datasets import Dataset
from transformers import TrainerCallback

from llmkd import (
    DHOConfig,
    DHOTrainer,
    DistillConfig,
    DistillTrainer,
    MoEMimicConfig,
    MoEMimicTrainer,
    PreferenceDistillConfig,
    PreferenceDistillTrainer,
    SinKDConfig,
    SinKDTrainer,
    TAIDConfig,
    TAIDTrainer,
)
from llmkd.heads import unwrap_model

MAX_STEPS, SAVE_STEPS, KILL_AT = 8, 4, 4
RUNS = ("whole", "killed", "resumed")
CASES = ("kd", "on_policy", "cross_tokenizer", "multi_teacher", "served", "taid", "sinkd", "moe_mimic", "preference",
         "dho")
#: the URL of the teacher server of the "served" case (tests/sglang_standin.py, started by main() before the forks)
SERVER_URL = None
# 24 rows, 4 per step: checkpoint-4 falls inside the first epoch (the resumed run must skip 4 batches of a
# shuffled epoch) and steps 7-8 are in the second epoch (a new shuffle).
ROWS, BATCH = 24, 4


def common(output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
                logging_steps=1, report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                use_cpu=True, per_device_train_batch_size=BATCH)


def lm_data():
    from utils import prompt_completion_rows

    return Dataset.from_list(prompt_completion_rows(ROWS, seed=3))


def build(case: str, output_dir: str):
    """The trainer of ``case`` and a function of it returning its method state (a JSON-able dict)."""
    from utils import make_tokenizer, tiny_llama

    args = common(output_dir)
    if case == "dho":
        return build_dho(args)
    tokenizer = make_tokenizer()
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    lm = dict(model=student, teacher_model=teacher, train_dataset=lm_data(), processing_class=tokenizer)
    no_state = lambda trainer: {}  # noqa: E731
    if case == "kd":
        config = DistillConfig(**args, learning_rate=1e-2, divergence="jsd", kd_ratio=0.5, loss_chunk_size=16)
        return DistillTrainer(args=config, **lm), no_state
    if case == "on_policy":
        # half the micro-batches sampled by the student, the others by the teacher (seq_kd), 2 per step, with the
        # sampled-token objective: the sources and the samples of steps 5-8 must be redrawn as in the whole run
        config = DistillConfig(**{**args, "per_device_train_batch_size": 2}, gradient_accumulation_steps=2,
                               learning_rate=1e-2, divergence="rkl", kd_ratio=0.5, loss_chunk_size=16, lmbda=0.5,
                               seq_kd=True, on_policy_objective="sampled_token", max_completion_length=6)
        return DistillTrainer(args=config, **lm), no_state
    if case == "cross_tokenizer":
        # a teacher with a SentencePiece-style tokenizer, the hybrid loss, half the micro-batches sampled by the
        # student (re-aligned for the teacher as they are drawn)
        from test_cross_tokenizer_trainer import ALPHABET
        from test_cross_tokenizer import metaspace_tokenizer

        teacher_tokenizer = metaspace_tokenizer(120, alphabet_from=ALPHABET)
        config = DistillConfig(**{**args, "per_device_train_batch_size": 2}, gradient_accumulation_steps=2,
                               learning_rate=1e-2, cross_tokenizer_loss="hybrid", kd_ratio=0.5, loss_chunk_size=16,
                               lmbda=0.5, max_completion_length=6)
        return DistillTrainer(args=config, **{**lm, "teacher_model": tiny_llama(len(teacher_tokenizer), 48, seed=2)},
                              teacher_processing_class=teacher_tokenizer), no_state
    if case == "multi_teacher":
        # two teachers, each row routed to one by its "domain", half the micro-batches sampled by the student
        rows = lm_data().to_list()
        data = Dataset.from_list([{**row, "domain": ("a", "b")[i % 2]} for i, row in enumerate(rows)])
        config = DistillConfig(**{**args, "per_device_train_batch_size": 2}, gradient_accumulation_steps=2,
                               learning_rate=1e-2, kd_ratio=0.5, loss_chunk_size=16, lmbda=0.5,
                               max_completion_length=6, teachers=[{"name": "a"}, {"name": "b", "weight": 0.5}],
                               teacher_routing_column="domain")
        teachers = {"a": teacher, "b": tiny_llama(len(tokenizer), 48, seed=4)}
        return DistillTrainer(args=config, **{**lm, "teacher_model": teachers, "train_dataset": data}), no_state
    if case == "served":
        # the teacher behind a server (SGLang's protocol, tests/sglang_standin.py, in the parent process), its
        # answers prefetched a batch ahead; half the micro-batches sampled by the student and scored when drawn
        config = DistillConfig(**{**args, "per_device_train_batch_size": 2}, gradient_accumulation_steps=2,
                               learning_rate=1e-2, kd_ratio=0.5, loss_chunk_size=16, lmbda=0.5,
                               max_completion_length=6, teacher_server=SERVER_URL, teacher_server_top_k=8)
        return DistillTrainer(args=config, **{**lm, "teacher_model": None}), no_state
    if case == "taid":
        # 2 micro-batches per step: the schedule's step sums span them
        config = TAIDConfig(**{**args, "per_device_train_batch_size": 2}, gradient_accumulation_steps=2,
                            learning_rate=1e-2, t_start=0.4, alpha=0.05, beta=0.5, loss_chunk_size=16)
        return TAIDTrainer(args=config, **lm), lambda trainer: dict(trainer.schedule.state_dict())
    if case == "sinkd":
        config = SinKDConfig(**args, learning_rate=5e-3, max_length=64, sinkhorn_mode="batch", sinkhorn_block=16,
                             sinkhorn_scale=0.05)
        return SinKDTrainer(args=config, **lm), no_state
    if case == "moe_mimic":
        student = tiny_llama(len(tokenizer), 32, layers=2, seed=1)  # upcycled by the d2s stage (layer 0)
        config = MoEMimicConfig(**args, learning_rate=1e-2, moe_stage="d2s", num_experts=4, num_experts_per_tok=2,
                                loss_chunk_size=16)
        return MoEMimicTrainer(args=config, **{**lm, "model": student}), no_state
    if case == "preference":
        from test_preference_trainer import preference_rows

        config = PreferenceDistillConfig(**args, learning_rate=5e-3, beta=0.1, loss_type=["kto_pair"])
        trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher, args=config,
                                           train_dataset=Dataset.from_list(preference_rows(ROWS, 3)),
                                           processing_class=tokenizer)
        return trainer, no_state
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def build_dho(args: dict):
    from test_dho_support import (
        clip_processor,
        image_dataset,
        student_processor,
        tiny_student,
        zero_shot_teacher,
    )

    teacher = zero_shot_teacher()
    # 8 labeled + 24 unlabeled rows: 24 paired items; alpha/beta are searched at the evaluations of steps 4 and 8
    config = DHOConfig(**args, labeled="25%", learning_rate=1e-2, per_device_eval_batch_size=8,
                       eval_strategy="steps", eval_steps=SAVE_STEPS)
    trainer = DHOTrainer(model=tiny_student(seed=1), teacher_model=teacher, args=config,
                         train_dataset=image_dataset(32, seed=0), eval_dataset=image_dataset(8, seed=1),
                         processing_class=student_processor(), teacher_processing_class=clip_processor())

    def state(trainer):
        config = unwrap_model(trainer.model).config
        return {"alpha": float(config.alpha), "beta": float(config.beta)}

    return trainer, state


class _Recorder(TrainerCallback):
    """Writes the method state after each optimizer step (before that step's evaluation and save) and, in the
    killed run, SIGKILLs the process once checkpoint-KILL_AT is written."""

    def __init__(self, trainer, method_state, folder: str, kill: bool):
        self.trainer, self.method_state, self.kill = trainer, method_state, kill
        self.states = open(os.path.join(folder, "states.jsonl"), "a")

    def on_step_end(self, args, state, control, **kwargs):
        self.states.write(json.dumps([state.global_step, self.method_state(self.trainer)]) + "\n")
        self.states.flush()

    def on_save(self, args, state, control, **kwargs):
        if self.kill and state.global_step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def run(case: str, which: str, root: str) -> None:
    folder = os.path.join(root, case, which)
    os.makedirs(folder, exist_ok=True)
    # the resumed run continues in the killed run's output_dir, from its checkpoint, as a user would
    output_dir = os.path.join(root, case, "killed" if which == "resumed" else which, "out")
    trainer, method_state = build(case, output_dir)
    losses = open(os.path.join(folder, "losses.jsonl"), "a")
    training_step = trainer.training_step

    def recorded_training_step(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        losses.write(json.dumps([trainer.state.global_step + 1, float(loss.detach())]) + "\n")
        losses.flush()
        return loss

    trainer.training_step = recorded_training_step
    # added last, so that its on_save runs after every other callback's (TAID writes its schedule there)
    trainer.add_callback(_Recorder(trainer, method_state, folder, kill=which == "killed"))
    checkpoint = os.path.join(output_dir, f"checkpoint-{KILL_AT}") if which == "resumed" else None
    trainer.train(resume_from_checkpoint=checkpoint)
    weights = {k: v.detach().clone() for k, v in unwrap_model(trainer.model).state_dict().items()}
    torch.save(weights, os.path.join(folder, "weights.pt"))
    with open(os.path.join(folder, "final.json"), "w") as handle:
        json.dump({"method_state": method_state(trainer), "log_history": trainer.state.log_history}, handle)


def forked(case: str, which: str, root: str) -> dict:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run(case, which, root)
        except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def main(root: str, cases: list[str]) -> None:
    global SERVER_URL
    torch.set_num_threads(1)
    if "served" in cases:  # the teacher of build("served"), served from this process to the forked runs
        from sglang_standin import SGLangStandIn
        from utils import make_tokenizer, tiny_llama

        tokenizer = make_tokenizer()
        SERVER_URL = SGLangStandIn(tiny_llama(len(tokenizer), 48, seed=2), tokenizer).url
    status = {}
    for case in cases:
        status[case] = {}
        for which in RUNS:
            status[case][which] = forked(case, which, root)
            if which == "killed":  # what the killed run left behind, before the resumed run adds to it
                out = os.path.join(root, case, which, "out")
                status[case][which]["checkpoints"] = sorted(
                    name for name in (os.listdir(out) if os.path.isdir(out) else []) if name.startswith("checkpoint-"))
            if which == "killed" and status[case][which].get("signal") != signal.SIGKILL:
                break  # nothing to resume from
    with open(os.path.join(root, "status.json"), "w") as handle:
        json.dump(status, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(CASES))
