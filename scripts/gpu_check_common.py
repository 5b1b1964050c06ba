"""What the parts of scripts/gpu_check.py share: the shapes, the device, models built from configs, step timing.

Every function takes the device explicitly, so that ``--smoke`` runs the very code of the GPU run on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import time

# Qwen2.5-0.5B and Qwen2.5-7B as their config.json files give them (weights random: nothing is downloaded).
QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)
QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1e6)

SHAPES = {
    # the GPU run: measurements at the real shapes; correctness on the real head shapes and on small models
    "gpu": dict(
        student=QWEN_05B, teacher=QWEN_7B,
        tokenizer_size=151665,  # Qwen2.5's tokenizer: both heads are padded beyond it
        seq=2048, warmup=2, steps=3, max_batch=64,
        engine=dict(tokens=600, chunk=None),  # chunk None: the engine's own choice (256 tokens at 151,936)
        small=dict(student=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=768, vocab_size=8192, tie_word_embeddings=True),
                   teacher=dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                intermediate_size=1024, vocab_size=8320, tie_word_embeddings=False),
                   tokenizer_size=8000, seq=128, batch=2, chunk=64),
    ),
    # --smoke: the same code at tiny shapes on the CPU
    "smoke": dict(
        student=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rope_theta=1e6),
        teacher=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=192, vocab_size=576, tie_word_embeddings=False, rope_theta=1e6),
        tokenizer_size=500, seq=48, warmup=1, steps=2, max_batch=2,
        engine=dict(tokens=37, chunk=16),
        small=dict(student=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
                   teacher=dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                intermediate_size=192, vocab_size=576, tie_word_embeddings=False),
                   tokenizer_size=500, seq=32, batch=2, chunk=16),
    ),
}

STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line with the seconds since this process started (stderr, unbuffered), so that a run stopped at
    its time limit still says how far it got."""
    import sys

    print(f"[{time.monotonic() - STARTED:6.1f}s pid {os.getpid()}] {message}", file=sys.stderr, flush=True)


def pick_device(smoke: bool):
    """``cuda`` for the GPU run (an error without one), ``cpu`` for ``--smoke``."""
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("scripts/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); run it "
                           "with --smoke to check the script itself on the CPU.")
    return torch.device("cuda")


def set_full_precision_products() -> None:
    """Matrix products as the correctness bounds assume them: float32 ones in IEEE float32 (no TF32), bfloat16 ones
    accumulated in float32 (cuBLAS may otherwise reduce split-K partial sums in bfloat16, which PyTorch allows by
    default: a property of the library's kernels, not of llmkd's code)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def build_causal_lm(config_kwargs: dict, dtype, device, seed: int, seq: int, family: str = "qwen2"):
    """A causal LM with random weights from config fields (``family`` ``qwen2`` or ``gemma2``), built directly on
    ``device`` in ``dtype``, attention through SDPA (Gemma 2's attention soft-capping needs the eager one)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config

    config_class = {"qwen2": Qwen2Config, "gemma2": Gemma2Config}[family]
    config = config_class(**config_kwargs, max_position_embeddings=max(seq + 8, 4096))
    config._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def matmul_parameters(model) -> int:
    """Parameters that take part in a matrix product per token: all but the input embedding (a lookup); a head
    tied to the embedding is counted once, as the head."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if head is embedding else total - embedding.numel()


def attention_flops_per_token(config, seq: int) -> float:
    """Forward FLOPs per token of causal attention's two products (``QK^T`` and ``PV``): ``2 * 2 * L * S * d / 2``
    (``d`` = heads x head dim; the causal mask halves the work)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2.0 * config.num_hidden_layers * seq * config.num_attention_heads * head_dim


def step_flops(student, teacher_config, teacher_params: int, tokens: int, seq: int) -> float:
    """Model FLOPs of one distillation step: the student's forward and backward (``3 x`` its forward: ``6 N_s``
    per token plus attention) and the teacher's forward (``2 N_t`` per token plus attention). A mode without a
    teacher forward (the cache) is charged the same FLOPs: MFU is then a throughput in floor-equivalent work."""
    student_forward = 2.0 * matmul_parameters(student) + attention_flops_per_token(student.config, seq)
    teacher_forward = 2.0 * teacher_params + attention_flops_per_token(teacher_config, seq)
    return tokens * (3.0 * student_forward + teacher_forward)


# dense bf16 matrix peak by GPU name (vendor datasheets, SXM parts); MFU is reported against this peak
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


def peak_flops(device) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s, the GPU's name) for MFU; (None, name) where the peak is unknown (the CPU)."""
    import torch

    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None), name


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    """``torch.cuda.max_memory_allocated`` since the last :func:`reset_peak`; on the CPU the process's peak
    resident memory (which cannot be reset: the whole process's peak)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_memory(device) -> None:
    """Free what the dropped references held (after an out-of-memory error, or between modes)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class StepClock:
    """Wall-clock seconds of each step with the device synchronised at both ends, and the peak memory of the
    measured steps (those after ``warmup``): ``begin(step)`` / ``end(step)`` around each step, or
    :meth:`callback` for a transformers Trainer."""

    def __init__(self, device, warmup: int):
        self.device = device
        self.warmup = warmup
        self.times: list[float] = []
        self.peak_gib = 0.0
        self._start = 0.0

    def begin(self, step: int) -> None:
        synchronize(self.device)
        if step == self.warmup:
            reset_peak(self.device)
        self._start = time.perf_counter()

    def end(self, step: int) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        if step >= self.warmup:
            self.peak_gib = max(self.peak_gib, peak_memory_gib(self.device))
        log(f"  step {step}: {self.times[-1]:.3f} s")

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.begin(state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                clock.end(state.global_step - 1)

        return Clock()

    def measured(self) -> list[float]:
        return self.times[self.warmup:]


@contextlib.contextmanager
def autocast(device, dtype):
    """The mixed-precision context the Trainer's ``bf16=True`` opens, for the hand-written loops."""
    import torch

    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
