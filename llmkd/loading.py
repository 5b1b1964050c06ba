"""Loading students, teachers and their tokenizers/processors from names or paths, with safe defaults.

Defaults (DESIGN.md conventions): safetensors only, ``trust_remote_code=False`` unless the recipe sets it, and a
failure to load names the role (student/teacher), what was asked for, and what to check.
"""

from __future__ import annotations

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
            config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
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
    if allow_pickle:
        logger.warning("allow_pickle_weights is set: the %s %r may be loaded from a pickle file, which can run "
                       "arbitrary code. Only do this for a checkpoint you trust.", role, name_or_path)
    else:
        _refuse_pickle_only_folder(name_or_path, role)
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        return _model_class(config, task).from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelLoadError(
            f"Could not load the {role} model {name_or_path!r}: {error}\n"
            f"Check that the path exists (or the Hub name is right and reachable), that it holds safetensors "
            f"weights (pickle .bin files are refused), and that trust_remote_code is set if it needs custom code."
        ) from error


def init_causal_lm_from_config(name_or_path: str, *, seed: int, dtype: str = "float32", revision: str | None = None,
                               trust_remote_code: bool = False, task: str = "causal_lm") -> PreTrainedModel:
    """A student with freshly initialised weights (seeded) from the configuration at ``name_or_path``."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
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
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        if is_vision_language_config(config):
            return AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not load the {role} tokenizer/processor from {name_or_path!r}: {error}\n"
            "Pass processing_class=... to the trainer, or save the tokenizer next to the model."
        ) from error


def tokenizer_of(processing_class):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processing_class, "tokenizer", processing_class)
