"""Loading students, teachers and their tokenizers/processors from names or paths, with safe defaults.

Defaults (DESIGN.md conventions): safetensors only, ``trust_remote_code=False`` unless the recipe sets it, and a
failure to load names the role (student/teacher), what was asked for, and what to check.
"""

from __future__ import annotations

import functools
import glob
import os

import logging

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from .paths import hub_is_offline, hub_is_reachable, looks_like_path
from .models import dual_head as _dual_head  # noqa: F401  (registers DualHeadModel with the Auto classes)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A student or teacher could not be loaded."""


def resolve_dtype(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}.") from None


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, quant_type: str = "nf4", compute_dtype=torch.float32):
    """A ``BitsAndBytesConfig`` for a quantized teacher, or None. The output head stays unquantized (the
    bitsandbytes default), so the chunked engine reads it as an ordinary matrix."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def is_vision_language_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def _is_classifier_class_name(name: str) -> bool:
    return name.endswith("ForSequenceClassification")


def detect_task(model: PreTrainedModel | str | None, *, revision: str | None = None,
                trust_remote_code: bool = False) -> str:
    """``"sequence_classification"`` for a sequence classifier (an object of a ``*ForSequenceClassification`` class,
    or a path whose config lists such an architecture), else ``"causal_lm"``."""
    if model is None:
        return "causal_lm"
    if isinstance(model, str):
        try:
            config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code,
                                                **hub_kwargs(model))
        except (OSError, ValueError):
            return "causal_lm"  # the loader reports the real problem with the role attached
        architectures = getattr(config, "architectures", None) or []
        return "sequence_classification" if any(map(_is_classifier_class_name, architectures)) else "causal_lm"
    inner = getattr(model, "get_base_model", lambda: model)()
    return "sequence_classification" if _is_classifier_class_name(type(inner).__name__) else "causal_lm"


def _model_class(config, task: str):
    if task == "sequence_classification":
        return AutoModelForSequenceClassification
    return AutoModelForImageTextToText if is_vision_language_config(config) else AutoModelForCausalLM


_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def _refuse_pickle_only_folder(name_or_path: str, role: str) -> None:
    """A local folder with pickle weights and no safetensors: say so (transformers' own error only names the
    missing safetensors file). Pickle files can run code when loaded, so llmkd never loads them."""
    if not os.path.isdir(name_or_path) or glob.glob(os.path.join(name_or_path, "*.safetensors")):
        return
    pickles = sorted(os.path.basename(p) for pattern in _PICKLE_PATTERNS
                     for p in glob.glob(os.path.join(name_or_path, pattern)))
    if pickles:
        raise ModelLoadError(
            f"Could not load the {role} model {name_or_path!r}: it holds pickle weights only ({', '.join(pickles)}), "
            "and llmkd loads safetensors only (a pickle can run arbitrary code when loaded). Re-save the model "
            "once, from a source you trust, with model.save_pretrained(path) (safetensors is the default), or set "
            "allow_pickle_weights: true in the recipe if you trust this checkpoint."
        )


def load_causal_lm(
    name_or_path: str,
    *,
    role: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quantization: BitsAndBytesConfig | None = None,
    device_map=None,
    task: str = "causal_lm",
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (or a LLaVA-style vision-language model; or, with ``task="sequence_classification"``, a
    sequence classifier) for the given role ("student" or "teacher"). Safetensors only, unless ``allow_pickle``
    (the config field ``allow_pickle_weights``) explicitly accepts pickle weights (.bin) from a trusted source."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, dtype=resolve_dtype(dtype),
                  use_safetensors=None if allow_pickle else True)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = device_map or ("cuda" if torch.cuda.is_available() else "cpu")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    _refuse_missing_local_path(name_or_path, role)
    if allow_pickle:
        logger.warning("allow_pickle_weights is set: the %s %r may be loaded from a pickle file, which can run "
                       "arbitrary code. Only do this for a checkpoint you trust.", role, name_or_path)
    else:
        _refuse_pickle_only_folder(name_or_path, role)
    try:
        kwargs.update(hub_kwargs(name_or_path))
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                            **hub_kwargs(name_or_path))
        return _model_class(config, task).from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        if not os.path.exists(name_or_path) and (hub_is_offline() or hub_kwargs(name_or_path)):
            raise ModelLoadError(
                f"The {role} model {name_or_path!r} is not a local folder and not in the local Hugging Face cache, and "
                "the Hub is offline (HF_HUB_OFFLINE=1, or it could not be reached). Download it where the Hub is "
                f"reachable (`hf download {name_or_path}`), or name a local folder saved with save_pretrained."
            ) from error
        raise ModelLoadError(
            f"Could not load the {role} model {name_or_path!r}: {error}\n"
            f"Check that the path exists (or the Hub name is right and reachable), that it holds safetensors "
            f"weights (pickle .bin files are refused), and that trust_remote_code is set if it needs custom code."
        ) from error


@functools.lru_cache(maxsize=None)
def _hub_unreachable() -> bool:
    unreachable = not hub_is_reachable()
    if unreachable:
        logger.warning("The Hugging Face Hub cannot be reached from this machine: models are read from the local "
                       "cache only (set HF_HUB_OFFLINE=1 to say so up front).")
    return unreachable


def hub_kwargs(name_or_path: str) -> dict:
    """``{"local_files_only": True}`` for a Hub name when the Hub cannot be reached (checked once, in well under a
    second), so that a model in the local cache loads at once and one that is not fails at once, instead of after
    a minute of connection retries."""
    if os.path.exists(name_or_path) or hub_is_offline():
        return {}
    return {"local_files_only": True} if _hub_unreachable() else {}


def _refuse_missing_local_path(name_or_path: str, role: str) -> None:
    """A name that can only be a local path (``./x``, ``/x``, ``a/b/c``) and does not exist: say so, instead of
    the Hub error transformers gives for anything that is not an existing folder."""
    if isinstance(name_or_path, str) and not os.path.exists(name_or_path) and looks_like_path(name_or_path):
        raise ModelLoadError(
            f"The {role} model {name_or_path!r} does not exist (looked for {os.path.abspath(name_or_path)}). Give an "
            "existing folder saved with save_pretrained, or a Hub id (namespace/name)."
        )


def init_causal_lm_from_config(name_or_path: str, *, seed: int, dtype: str = "float32", revision: str | None = None,
                               trust_remote_code: bool = False, task: str = "causal_lm") -> PreTrainedModel:
    """A student with freshly initialised weights (seeded) from the configuration at ``name_or_path``."""
    _refuse_missing_local_path(name_or_path, "student")
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                            **hub_kwargs(name_or_path))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"Could not read the student configuration at {name_or_path!r}: {error}") from error
    model_class = _model_class(config, task)
    torch_dtype = resolve_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_config(config, trust_remote_code=trust_remote_code)
    return model if torch_dtype == "auto" else model.to(torch_dtype)


def load_processing_class(name_or_path: str, *, role: str, revision: str | None = None,
                          trust_remote_code: bool = False):
    """The tokenizer of a text model, or the processor of a vision-language model."""
    try:
        local = hub_kwargs(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                            **local)
        if is_vision_language_config(config):
            return AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                                 **local)
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                             **local)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load the {role} tokenizer/processor from {name_or_path!r}: {error}\n"
            "Pass processing_class=... to the trainer, or save the tokenizer next to the model."
        ) from error


def tokenizer_of(processing_class):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processing_class, "tokenizer", processing_class)


def position_limit(model_or_config) -> int | None:
    """The number of positions a model was built for (``max_position_embeddings`` of its text config), or None
    when it has no such limit or extrapolates by design (RoPE with dynamic NTK scaling)."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return None
    return limit if isinstance(limit, int) and limit > 0 else None


def check_sequence_lengths(dataset, max_length: int | None, models: dict, split: str = "train") -> None:
    """Refuse prepared rows longer than a model's positions, before training.

    A model with learned absolute positions (BERT) would crash at the first step with a tensor-size error; a RoPE
    model would train silently on positions it never saw (its teacher signal degrades). ``models`` maps a role
    ("student", "teacher") to a model or config (None entries are skipped); ``dataset`` is a prepared dataset with
    an ``input_ids`` column. The rows are measured (with Arrow, no Python loop) only when ``max_length`` allows
    rows longer than the shortest limit, so a run whose ``max_length`` fits costs nothing.
    """
    limits = {role: limit for role, m in models.items() if m is not None and (limit := position_limit(m))}
    if not limits or dataset is None or len(dataset) == 0 or "input_ids" not in dataset.column_names:
        return
    shortest = min(limits.values())
    if max_length is not None and max_length <= shortest:
        return
    import pyarrow.compute as pc

    longest = pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0
    if longest > shortest:
        named = ", ".join(f"the {role} has {limit}" for role, limit in limits.items())
        raise ValueError(
            f"The {split} data has rows of up to {longest} tokens (max_length {max_length}), more than the models' "
            f"positions ({named}: max_position_embeddings). Set max_length <= {shortest}, or use models built for "
            "longer sequences."
        )


# ------------------------------------------------------------------------------------------------------------------
# The one construction path of students, teachers and their tokenizers from a config (every trainer, cache-teacher)
# ------------------------------------------------------------------------------------------------------------------
def student_processing_class(args, name: str | None = None):
    """The student's tokenizer or processor named by ``args.model_name_or_path`` (or ``name``)."""
    return load_processing_class(name or args.model_name_or_path, role="student", revision=args.model_revision,
                                 trust_remote_code=args.trust_remote_code)


def teacher_processing_class(args, name: str | None = None):
    """The teacher's tokenizer or processor named by ``args.teacher_model_name_or_path`` (or ``name``)."""
    return load_processing_class(name or args.teacher_model_name_or_path, role="teacher",
                                 revision=args.teacher_revision, trust_remote_code=args.trust_remote_code)


def load_student(model, args, processing_class=None, task: str = "causal_lm"):
    """``(student, processing_class)`` from a model object or a name (``model``, else ``args.model_name_or_path``)
    and a config with the fields of :class:`~llmkd.config.ModelSourceFields`: loaded with ``student_dtype``,
    ``model_revision``, ``trust_remote_code`` and ``allow_pickle_weights``, or built with fresh weights from its
    configuration when the config sets ``init_student_from_config``. The processing class is loaded from the same
    name unless given; a model object needs it given."""
    model = model if model is not None else args.model_name_or_path
    if model is None:
        raise ValueError("No student: pass model=... or set model_name_or_path in the config/recipe.")
    if isinstance(model, str):
        name = model
        # the model first: a wrong path is then reported as the student model's, with the model's fix
        if getattr(args, "init_student_from_config", False):
            model = init_causal_lm_from_config(name, seed=args.seed, dtype=args.student_dtype,
                                               revision=args.model_revision,
                                               trust_remote_code=args.trust_remote_code, task=task)
        else:
            model = load_causal_lm(name, role="student", dtype=args.student_dtype, revision=args.model_revision,
                                   trust_remote_code=args.trust_remote_code, task=task,
                                   allow_pickle=args.allow_pickle_weights)
        if processing_class is None:
            processing_class = student_processing_class(args, name)
    if processing_class is None:
        raise ValueError("The student was given as a model object: pass its tokenizer (or processor) as "
                         "processing_class=...")
    return model, processing_class


def load_teacher(teacher, args, teacher_tokenizer=None, task: str = "causal_lm"):
    """``(teacher, its tokenizer)`` from a model object or a name (``teacher``, else
    ``args.teacher_model_name_or_path``): loaded with ``teacher_dtype``, ``teacher_revision``, 4/8-bit quantization
    (``teacher_load_in_4bit`` / ``teacher_load_in_8bit``, ``teacher_bnb_4bit_quant_type``),
    ``trust_remote_code`` and ``allow_pickle_weights``. The tokenizer is loaded from the same name unless given
    (None for a model object given without one)."""
    teacher = teacher if teacher is not None else args.teacher_model_name_or_path
    if teacher is None:
        raise ValueError("No teacher: pass teacher_model=... or set teacher_model_name_or_path in the config/recipe.")
    if isinstance(teacher, str):
        name = teacher
        compute_dtype = resolve_dtype(args.teacher_dtype) if args.teacher_dtype != "auto" else torch.float32
        quant = quantization_config(args.teacher_load_in_4bit, args.teacher_load_in_8bit,
                                    args.teacher_bnb_4bit_quant_type, compute_dtype=compute_dtype)
        teacher = load_causal_lm(name, role="teacher", dtype=args.teacher_dtype, revision=args.teacher_revision,
                                 trust_remote_code=args.trust_remote_code, quantization=quant, task=task,
                                 allow_pickle=args.allow_pickle_weights)
        if teacher_tokenizer is None:
            teacher_tokenizer = tokenizer_of(teacher_processing_class(args, name))
    return teacher, teacher_tokenizer
