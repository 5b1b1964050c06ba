"""Configuration of distillation runs: :class:`DistillConfig` (a ``transformers.TrainingArguments``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments

DTYPES = ("float32", "bfloat16", "float16", "auto")
TASK_CHOICES = ("auto", "causal_lm", "sequence_classification")
NONFINITE_LOSS_CHOICES = ("stop", "skip")
ON_POLICY_OBJECTIVES = ("divergence", "sampled_token")


@dataclass
class RunOutputFields:
    """Config fields for the end of a run (evaluation, report, publishing); shared by every llmkd config."""

    eval_tasks: str | None = field(
        default=None, metadata={"help": "Tasks to evaluate after training (comma-separated)."}
    )
    eval_limit: int | None = field(default=None, metadata={"help": "Examples per evaluation task (None: all)."})
    eval_teacher: bool = field(default=True, metadata={"help": "Also evaluate the teacher (retention ratio)."})
    report: bool = field(default=True, metadata={"help": "Write report.html with PNG curves after training."})
    hub_endpoint: str | None = field(default=None, metadata={"help": "Hub server for push_to_hub (default: HF's)."})
    nonfinite_loss: str = field(
        default="stop", metadata={"help": "A NaN/inf training loss: 'stop' (error naming the step) or 'skip' (drop "
                                          "the step's gradients, count it as nonfinite_steps in the logs)."}
    )

    def adapt_to_launcher(self) -> None:
        """Settings a multi-process launch needs on a machine without a GPU (:mod:`llmkd.launch`); called by every
        llmkd config's ``__post_init__`` before ``TrainingArguments`` reads them."""
        from .launch import adapt_to_launcher

        adapt_to_launcher(self)

    def check_run_outputs(self) -> None:
        """Validate the fields above (called by the configs' ``__post_init__``)."""
        if getattr(self, "hub_token", None):
            raise ValueError("hub_token is not accepted: the Trainer pickles its arguments into every checkpoint "
                             "(training_args.bin), so the token would be saved on disk. Set HF_TOKEN in the "
                             "environment or run `hf auth login` instead.")
        if self.nonfinite_loss not in NONFINITE_LOSS_CHOICES:
            raise ValueError(f"nonfinite_loss must be one of {NONFINITE_LOSS_CHOICES}, got {self.nonfinite_loss!r}.")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 (examples per task), got {self.eval_limit}.")


@dataclass
class ModelSourceFields(RunOutputFields):
    """Config fields that name the student, the teacher, the data and a LoRA adapter, and what ``llmkd train``
    leaves after training (evaluation, report, publishing: see DistillConfig); shared by every llmkd config
    (:class:`DistillConfig` and the TRL-based :class:`~llmkd.PreferenceDistillConfig`)."""

    # student
    model_name_or_path: str | None = field(default=None, metadata={"help": "The student model (name or path)."})
    model_revision: str | None = field(default=None, metadata={"help": "Revision of the student."})
    student_dtype: str = field(default="float32", metadata={"help": f"Student dtype, one of {DTYPES}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code (off by default)."})
    allow_pickle_weights: bool = field(default=False, metadata={
        "help": "Accept pickle (.bin) weights for the student and teacher (off: safetensors only)."})
    # teacher
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The teacher (name or path)."})
    teacher_revision: str | None = field(default=None, metadata={"help": "Revision of the teacher."})
    teacher_dtype: str = field(default="float32", metadata={"help": f"Teacher dtype, one of {DTYPES}."})
    teacher_load_in_4bit: bool = field(default=False, metadata={"help": "Load the teacher in 4 bits (bitsandbytes)."})
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "Load the teacher in 8 bits (bitsandbytes)."})
    teacher_bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type (nf4/fp4)."})
    # data
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset: local file/folder or Hub name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    # LoRA
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of the full student."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: all linear layers but the head)."}
    )

    def check_model_sources(self) -> None:
        """Validate the fields above (called by the configs' ``__post_init__``)."""
        for name in ("student_dtype", "teacher_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}.")
        self.check_run_outputs()
        if self.teacher_load_in_4bit and self.teacher_load_in_8bit:
            raise ValueError("Choose one of teacher_load_in_4bit and teacher_load_in_8bit, not both.")


@dataclass
class OnPolicyFields:
    """Config fields of on-policy distillation (docs/ON_POLICY.md): where a batch's completions come from and how
    they are sampled; shared by the token-level trainers (DistillTrainer, TAID, SinKD, MoE mimic). The field names
    are TRL's (``GKDConfig`` / ``DistillationConfig``) where TRL has one."""

    lmbda: float = field(default=0.0, metadata={
        "help": "Probability that a micro-batch's completions are sampled from the student (0: the dataset's "
                "completions, off-policy; 1: fully on-policy)."})
    seq_kd: bool = field(default=False, metadata={
        "help": "Micro-batches not sampled from the student get completions sampled from the teacher "
                "(sequence-level KD) instead of the dataset's."})
    on_policy_objective: str = field(default="divergence", metadata={
        "help": f"The loss of student-sampled micro-batches, one of {ON_POLICY_OBJECTIVES}: the configured "
                "divergence on the full distributions, or the sampled-token policy gradient."})
    off_policy_steps: int = field(default=0, metadata={
        "help": "The first N optimizer steps train on the dataset's completions (a warm start), then lmbda and "
                "seq_kd apply."})
    max_completion_length: int = field(default=128, metadata={"help": "The most tokens sampled per completion."})
    generation_temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature (None: the distillation temperature, as TRL's single temperature)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of completions (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "min-p sampling (None: off)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty of sampling (1.0: off)."})
    generation_kwargs: dict | str | None = field(default=None, metadata={
        "help": "Other sampling fields: GenerationConfig's (transformers generate) or SamplingParams' (use_vllm), "
                "e.g. '{\"do_sample\": false}'."})
    # vLLM (TRL's DistillationConfig names); docs/ON_POLICY.md "Generation backends"
    use_vllm: bool = field(default=False, metadata={
        "help": "Sample the student's completions with vLLM instead of transformers generate (llmkd[vllm])."})
    vllm_mode: str = field(default="colocate", metadata={
        "help": "'colocate' (an engine in each training process) or 'server' (a `trl vllm-serve` server; CUDA)."})
    vllm_server_base_url: str | None = field(default=None, metadata={
        "help": "Server mode: the server's URL (overrides vllm_server_host and vllm_server_port)."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: the server's host."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: the server's port."})
    vllm_server_timeout: float = field(default=240.0, metadata={
        "help": "Server mode: seconds to wait for the server to answer before failing."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Server mode: port of the weight-update group."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "Colocate mode: fraction of the GPU's memory the engine takes (weights and KV cache)."})
    vllm_max_model_length: int | None = field(default=None, metadata={
        "help": "Colocate mode: the engine's context length (None: the model's)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={
        "help": "Colocate mode: GPUs per engine (must divide the number of processes)."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={
        "help": "Colocate mode: free the engine's memory between generations."})
    vllm_model_impl: str = field(default="vllm", metadata={
        "help": "Colocate mode: vLLM's model implementation, 'vllm' or 'transformers'."})

    @property
    def samples_completions(self) -> bool:
        """Whether any micro-batch of this run may get generated completions (``lmbda > 0`` or ``seq_kd``)."""
        return self.lmbda > 0 or self.seq_kd

    def sampling_settings(self):
        """The :class:`~llmkd.generation.SamplingSettings` these fields describe."""
        from .generation import SamplingSettings

        temperature = self.generation_temperature
        if temperature is None:
            temperature = getattr(self, "temperature", 1.0)
        return SamplingSettings(max_completion_length=self.max_completion_length, temperature=temperature,
                                top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                                repetition_penalty=self.repetition_penalty,
                                generation_kwargs=self.generation_kwargs or {})

    def check_on_policy_fields(self) -> None:
        """Validate the fields above (called by the configs' ``__post_init__``)."""
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1] (the probability of a student-sampled micro-batch), got "
                             f"{self.lmbda}.")
        if self.on_policy_objective not in ON_POLICY_OBJECTIVES:
            raise ValueError(f"on_policy_objective={self.on_policy_objective!r} is not one of "
                             f"{ON_POLICY_OBJECTIVES}.")
        if self.off_policy_steps < 0:
            raise ValueError(f"off_policy_steps must be >= 0, got {self.off_policy_steps}.")
        self.generation_kwargs = _as_keyword_dict(self.generation_kwargs, "generation_kwargs")
        self.sampling_settings()  # validates the sampling fields
        if self.use_vllm:
            if self.vllm_mode not in ("colocate", "server"):
                raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {self.vllm_mode!r}.")
            if self.lmbda == 0:
                raise ValueError("use_vllm=True samples the student's completions, and lmbda=0 samples none (seq_kd's "
                                 "teacher samples use transformers generate). Set lmbda > 0, or use_vllm=False.")

    def vllm_engine_kwargs(self) -> dict:
        """The keyword arguments of :class:`~llmkd.generation.VLLMSampler` (TRL's VLLMGeneration fields) these
        fields give."""
        return dict(server_base_url=self.vllm_server_base_url, server_host=self.vllm_server_host,
                    server_port=self.vllm_server_port, server_timeout=self.vllm_server_timeout,
                    group_port=self.vllm_group_port, gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                    max_model_length=self.vllm_max_model_length, tensor_parallel_size=self.vllm_tensor_parallel_size,
                    enable_sleep_mode=self.vllm_enable_sleep_mode, model_impl=self.vllm_model_impl,
                    trust_remote_code=getattr(self, "trust_remote_code", False))


@dataclass
class DistillConfig(OnPolicyFields, ModelSourceFields, TrainingArguments):
    r"""Configuration for :class:`~llmkd.DistillTrainer`: token-level distillation with any divergence of
    docs/ALGORITHMS.md section 0, mixed with the hard-label cross-entropy.

    Every ``transformers.TrainingArguments`` field works. Defaults that differ from TrainingArguments:
    ``remove_unused_columns=False`` (the collator keeps image fields) and ``logging_steps=10``.

    Parameters that name the models:
        model_name_or_path: the student, when the trainer is not given a model object.
        model_revision / student_dtype: revision and dtype of the student (``float32`` default).
        init_student_from_config: build the student from the configuration at ``model_name_or_path`` with freshly
            initialised weights (seeded by ``seed``) instead of loading weights: distillation from scratch.
        trust_remote_code: allow custom model code for the student, teacher, tokenizer and processor (False).
        task: ``auto`` (default: a student of a ``*ForSequenceClassification`` class, or whose config names one,
            is a sequence classifier; anything else a causal LM), ``causal_lm`` or ``sequence_classification``.
            Classifiers are distilled per example on their (B, C) logits from GLUE-style rows
            (:mod:`llmkd.data.classification`).

    Parameters that control the teacher:
        teacher_model_name_or_path: the teacher, when the trainer is not given a model object.
        teacher_revision: revision of the teacher.
        teacher_dtype: ``float32`` (default: full precision), ``bfloat16``, ``float16`` or ``auto``.
        teacher_load_in_4bit / teacher_load_in_8bit: load the teacher quantized with bitsandbytes
            (4-bit uses ``teacher_bnb_4bit_quant_type``, default ``nf4``).

    Parameters of the offline teacher (a top-k teacher-logit cache, :mod:`llmkd.cache`):
        teacher_cache: train from this cache (written by ``llmkd cache-teacher``) instead of running the teacher.
        cache_top_k: tokens kept per position when writing a cache (64).
        cache_temperature: the temperature of the cached log-probabilities (1.0); training from a cache needs the
            same ``temperature``.
        cache_shard_rows: dataset rows per cache shard (1024).

    Parameters of a teacher behind an inference server (docs/SERVED_TEACHERS.md):
        teacher_server: the base URL of a vLLM server (``vllm serve TEACHER --max-logprobs K``) or an SGLang server
            (``python -m sglang.launch_server --model-path TEACHER``) serving the teacher, e.g.
            ``http://127.0.0.1:8000``: training reads the teacher's top-k log-probabilities of each batch from it
            (no teacher in the training process), and ``llmkd cache-teacher`` writes its cache from it.
        teacher_server_model: the served model name (None: the only one the server serves).
        teacher_server_api: ``vllm``, ``sglang`` or ``auto`` (the default: SGLang when the server answers
            ``GET /get_model_info``, else vLLM); an entry of ``teachers`` may name its own.
        teacher_server_top_k: log-probabilities per position asked for in training (20, vLLM's default
            ``--max-logprobs``; 0: only the sampled tokens', for the sampled-token objective at ``lmbda: 1``); the
            cache writer asks for ``cache_top_k``. The API key, if the server needs one, is
            read from the environment variable ``LLMKD_TEACHER_SERVER_API_KEY`` (never from a recipe).
        teacher_server_concurrency: requests in flight (8); teacher_server_timeout: seconds per request (120);
            teacher_server_retries: retries of a failed request, with exponential backoff (5).

    Parameters of several teachers (docs/MULTI_TEACHER.md):
        teachers: a list of teachers, each ``{name, model_name_or_path | teacher_cache | teacher_server, weight}``
            (``teacher_server_model`` and ``teacher_server_api`` too for a served one; an entry without a source
            takes the model given to the trainer under its name, ``teacher_model={name: model}``). Replaces
            ``teacher_model_name_or_path`` / ``teacher_cache`` / ``teacher_server``.
        teacher_routing_column: the dataset column naming each row's teacher (the domain-expert setting); None:
            every teacher on every token, their losses weighted by ``weight`` (normalised to sum 1).

    Parameters of a teacher with another tokenizer (docs/CROSS_TOKENIZER.md):
        cross_tokenizer_loss: None (default: the teacher must share the student's tokenizer), or the loss on the
            spans where the two tokenizations align: ``uld`` (sorted-probability distance), ``hybrid`` (the
            ``divergence`` on the tokens both vocabularies share, ULD on the rest) or ``span`` (span likelihood
            matching). The teacher's tokenizer is loaded from the teacher's path (or given as
            ``teacher_processing_class``); both must be fast tokenizers.
        cross_tokenizer_top_k: the probabilities per side ULD sorts and compares (64).
        hybrid_shared_weight / hybrid_rest_weight: the hybrid's weights of its shared and its ULD part (None:
            GOLD's, the shared fraction of the teacher's vocabulary and its complement).

    Parameters that control the loss:
        divergence: ``fkl`` (forward KL, Hinton KD), ``rkl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``tvd`` or
            ``abkd`` (ABKD's alpha-beta divergence), or any name added with
            :func:`llmkd.losses.register_divergence`; the long names are accepted too (``kl`` and ``forward_kl`` =
            ``fkl``, ``reverse_kl``, ``generalized_jsd``, ``skew_forward_kl``, ``skew_reverse_kl``, ``alpha_beta``).
        temperature: softens both distributions; the divergence is multiplied by ``T^2``.
        jsd_beta: mixture weight of the generalized JSD (0 -> forward KL, 1 -> reverse KL).
        skew_alpha: skew coefficient of the skew KLs (DistiLLM, 0.1).
        divergence_kwargs: the divergence's other hyperparameters, by the names of its kernel's keyword
            parameters, e.g. ``{ab_alpha: 0.2, ab_beta: 0.7}`` for ``abkd`` (its defaults); a name the divergence
            does not take is an error (JSON on the command line: ``--divergence_kwargs '{"ab_alpha": 0.5}'``).
        kd_ratio: loss = ``(1 - kd_ratio) * CE + kd_ratio * divergence``, both token means over the global batch.
        use_chunked_loss: compute the loss with the chunked engine (never materialises token x vocab logits).
            False uses the models' own full logits (the dense reference path).
        loss_chunk_size: tokens per chunk in the chunked engine; None (default) chooses it from the vocabulary:
            the power of two nearest to 2^25 logits per chunk (512 tokens at vocab 64k, 256 at 152k), which measured
            as fast as larger chunks and keeps each chunk buffer near 128 MB (BENCHMARKS.md).
        verify_logit_head: check once before training that the chunked path reproduces each model's logits
            (including its logit post-processing) and refuse the model if not.

    Parameters that control the data:
        dataset_name: a local file (json/jsonl/csv/parquet), a folder saved with ``save_to_disk``, or a Hub dataset.
        dataset_config / dataset_train_split / dataset_eval_split: how to pick the splits.
        max_length: sequences are truncated to their first ``max_length`` tokens.
        completion_only_loss: when the data has a prompt/completion split (or chat turns), train and distil on
            the completion (assistant) tokens only; False uses every token.
        dataset_num_proc: processes for tokenisation.

    Parameters of on-policy distillation (docs/ON_POLICY.md; token-level trainers):
        lmbda: the probability that a micro-batch's completions are sampled from the current student (GKD's
            lambda); 0 (default) trains on the dataset's completions exactly as without these fields.
        seq_kd: micro-batches not sampled from the student get completions sampled from the teacher
            (sequence-level KD) instead of the dataset's.
        on_policy_objective: ``"divergence"`` (default: the configured divergence on the student's samples) or
            ``"sampled_token"`` (the policy gradient with advantage ``log p - log q`` on the sampled tokens).
        off_policy_steps: the first N optimizer steps use the dataset's completions (a warm start).
        max_completion_length, generation_temperature (None: ``temperature``), top_p, top_k, min_p,
            repetition_penalty, generation_kwargs: how completions are sampled.
        use_vllm: sample the student's completions with vLLM (``llmkd[vllm]``) instead of transformers
            ``generate``; vllm_mode ``"colocate"`` (default) or ``"server"``, and TRL's ``vllm_*`` fields
            (vllm_server_base_url / host / port / timeout, vllm_group_port, vllm_gpu_memory_utilization,
            vllm_max_model_length, vllm_tensor_parallel_size, vllm_enable_sleep_mode, vllm_model_impl).

    Parameters of robustness:
        nonfinite_loss: a NaN or infinite training loss ``"stop"``s the run with an error naming the optimizer step
            (default), or is ``"skip"``ped: the step's gradients are dropped and ``nonfinite_steps`` in the logs
            counts such steps (:mod:`llmkd.trainers.guards`; every llmkd trainer).

    Parameters that control LoRA (when no ``peft_config`` is passed to the trainer):
        use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules.

    Parameters of what ``llmkd train`` leaves in ``output_dir`` (docs/EVALUATION.md, docs/PUBLISHING.md):
        eval_tasks: evaluate the student at the end of training on these tasks (comma-separated: llmkd's offline
            ``llmkd_addition_exact_match,llmkd_addition_choice,llmkd_addition_perplexity``, any lm-eval task, or for
            classifiers ``llmkd_sentiment`` / ``eval_dataset``); results in ``results.json`` and ``results.md``.
        eval_limit: examples per task (None: all).
        eval_teacher: also score the teacher, for the retention ratio (True).
        report: write ``report.html`` with PNG curves (True).
        hub_endpoint: the Hub server ``push_to_hub`` publishes to (default: huggingface_hub's, ``HF_ENDPOINT``).
            ``push_to_hub=True`` publishes once, after training, with llmkd's model card. ``hub_token`` is refused
            (the Trainer would pickle it into every checkpoint): the token comes from ``HF_TOKEN`` or
            ``hf auth login``.
    """

    init_student_from_config: bool = field(
        default=False, metadata={"help": "Build the student from the config at model_name_or_path with fresh weights."}
    )
    task: str = field(default="auto", metadata={"help": f"One of {TASK_CHOICES}."})
    # offline teacher cache
    teacher_cache: str | None = field(default=None, metadata={"help": "Train from this teacher-logit cache."})
    cache_top_k: int = field(default=64, metadata={"help": "Top-k tokens per position when writing a cache."})
    cache_temperature: float = field(default=1.0, metadata={"help": "Temperature of the cached log-probs."})
    cache_shard_rows: int = field(default=1024, metadata={"help": "Dataset rows per cache shard."})
    # teacher behind an inference server
    teacher_server: str | None = field(default=None, metadata={
        "help": "URL of a vLLM or SGLang server serving the teacher (docs/SERVED_TEACHERS.md)."})
    teacher_server_model: str | None = field(default=None, metadata={"help": "The served teacher's model name."})
    teacher_server_api: str = field(default="auto", metadata={
        "help": "The server's API: vllm, sglang or auto (detected)."})
    teacher_server_top_k: int = field(default=20, metadata={"help": "Log-probs per position asked of the server."})
    teacher_server_concurrency: int = field(default=8, metadata={"help": "Requests in flight to the server."})
    teacher_server_timeout: float = field(default=120.0, metadata={"help": "Seconds per request to the server."})
    teacher_server_retries: int = field(default=5, metadata={"help": "Retries of a failed server request."})
    # several teachers
    teachers: str | None = field(default=None, metadata={
        "help": "Several teachers: a list of {name, model_name_or_path | teacher_cache | teacher_server, weight} "
                "(docs/MULTI_TEACHER.md); JSON on the command line."})
    teacher_routing_column: str | None = field(default=None, metadata={
        "help": "With teachers: the dataset column naming each row's teacher (None: mix every teacher by weight)."})
    # loss
    divergence: str = field(default="fkl", metadata={
        "help": "fkl, rkl, jsd, skew_fkl, skew_rkl, tvd or abkd (also accepted: kl and forward_kl = fkl, reverse_kl = "
                "rkl, generalized_jsd = jsd, skew_forward_kl, skew_reverse_kl, alpha_beta = abkd)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature (loss scaled by T^2)."})
    jsd_beta: float = field(default=0.5, metadata={"help": "Generalized JSD mixture weight."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew KL coefficient."})
    divergence_kwargs: dict | str | None = field(default=None, metadata={
        "help": "The divergence's other hyperparameters, e.g. '{\"ab_alpha\": 0.2, \"ab_beta\": 0.7}' for abkd."})
    kd_ratio: float = field(default=0.5, metadata={"help": "Weight of the divergence; CE gets 1 - kd_ratio."})
    cross_tokenizer_loss: str | None = field(default=None, metadata={
        "help": "A teacher with another tokenizer: uld, hybrid or span (docs/CROSS_TOKENIZER.md)."})
    cross_tokenizer_top_k: int = field(default=64, metadata={"help": "Probabilities per side ULD compares."})
    hybrid_shared_weight: float | None = field(default=None, metadata={
        "help": "The hybrid loss's weight of the shared vocabulary (default: its fraction of the teacher's)."})
    hybrid_rest_weight: float | None = field(default=None, metadata={
        "help": "The hybrid loss's weight of ULD on the rest (default: 1 - hybrid_shared_weight)."})
    use_chunked_loss: bool = field(default=True, metadata={"help": "Use the chunked engine (default)."})
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens per chunk in the chunked engine (default: from the vocabulary)."})
    verify_logit_head: bool = field(default=True, metadata={"help": "Verify the chunked path reproduces logits."})
    # data
    max_length: int | None = field(default=1024, metadata={"help": "Truncate sequences to this many tokens."})
    completion_only_loss: bool = field(default=True, metadata={"help": "Train on completion tokens only."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    # TrainingArguments defaults changed for distillation
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all columns for the collator."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        self.adapt_to_launcher()
        super().__post_init__()
        if self.task not in TASK_CHOICES:
            raise ValueError(f"task={self.task!r} is not one of {TASK_CHOICES}.")
        self.check_model_sources()
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.cache_top_k < 1 or self.cache_shard_rows < 1:
            raise ValueError("cache_top_k and cache_shard_rows must be >= 1.")
        if self.cache_temperature <= 0:
            raise ValueError(f"cache_temperature must be > 0, got {self.cache_temperature}.")
        self.divergence_kwargs = _as_keyword_dict(self.divergence_kwargs, "divergence_kwargs")
        shared = sorted({"alpha", "beta"} & set(self.divergence_kwargs))
        if shared:
            raise ValueError(f"divergence_kwargs sets {shared}: set jsd_beta (the jsd's beta) or skew_alpha (the skew "
                             "KLs' alpha) instead.")
        if self.cross_tokenizer_loss is not None and self.cross_tokenizer_loss not in ("uld", "hybrid", "span"):
            raise ValueError(f"cross_tokenizer_loss must be uld, hybrid, span or None, got "
                             f"{self.cross_tokenizer_loss!r}.")
        if self.cross_tokenizer_top_k < 1:
            raise ValueError(f"cross_tokenizer_top_k must be >= 1, got {self.cross_tokenizer_top_k}.")
        if self.teacher_server_api not in ("auto", "vllm", "sglang"):
            raise ValueError(f"teacher_server_api must be auto, vllm or sglang, got {self.teacher_server_api!r}.")
        if self.teacher_server_top_k < 0 or self.teacher_server_concurrency < 1 or self.teacher_server_retries < 0 \
                or self.teacher_server_timeout <= 0:
            raise ValueError("teacher_server_top_k must be >= 0 (0: the sampled tokens' log-probabilities only), "
                             "teacher_server_concurrency >= 1, teacher_server_retries >= 0 and "
                             "teacher_server_timeout > 0.")
        self.teachers = _teacher_entries(self)
        if self.teacher_routing_column is not None and not self.teachers:
            raise ValueError("teacher_routing_column routes rows between several teachers: set teachers too.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be >= 1, got {self.loss_chunk_size}.")
        self.check_on_policy_fields()


#: the keys of one entry of ``teachers``, and the sources among them (at most one per entry)
TEACHER_ENTRY_KEYS = ("name", "model_name_or_path", "teacher_cache", "teacher_server", "teacher_server_model",
                      "teacher_server_api", "weight")
TEACHER_SOURCES = ("model_name_or_path", "teacher_cache", "teacher_server")


def _teacher_entries(config) -> list[dict] | None:
    """``config.teachers`` checked: None, or a list of entries (a JSON string on the command line)."""
    value = config.teachers
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"teachers must be a list of teachers, e.g. '[{{\"name\": \"math\", "
                             f"\"model_name_or_path\": \"PATH\"}}, ...]', got {value!r} ({error}).") from None
    if not isinstance(value, list) or not all(isinstance(entry, dict) for entry in value):
        raise ValueError(f"teachers must be a list of mappings (name, model_name_or_path | teacher_cache | "
                         f"teacher_server, weight), got {value!r}.")
    single = [name for name in ("teacher_model_name_or_path", "teacher_cache", "teacher_server")
              if getattr(config, name)]
    if single:
        raise ValueError(f"teachers lists the teachers, but {single} is set too: move that teacher into teachers.")
    for i, entry in enumerate(value):
        unknown = sorted(set(entry) - set(TEACHER_ENTRY_KEYS))
        if unknown:
            raise ValueError(f"teachers[{i}] has unknown keys {unknown}; allowed: {list(TEACHER_ENTRY_KEYS)}.")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"teachers[{i}] needs a name (the routing column's value for its rows, and its logs).")
        sources = [key for key in TEACHER_SOURCES if entry.get(key)]
        if len(sources) > 1:
            raise ValueError(f"teachers[{i}] ({entry['name']}) gives {sources}: give one of {list(TEACHER_SOURCES)}.")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"teachers[{i}] ({entry['name']}) has weight {weight!r}: a number >= 0.")
    return [dict(entry) for entry in value]


def _as_keyword_dict(value, name: str) -> dict:
    """A dict-valued field given as a dict, a JSON object string (the command line) or None (-> ``{}``)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} must be a JSON object such as '{{\"ab_alpha\": 0.5}}', got {value!r} "
                             f"({error}).") from None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError(f"{name} must map parameter names to values, got {value!r}.")
    return dict(value)
