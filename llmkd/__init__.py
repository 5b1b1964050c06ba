"""llmkd: knowledge distillation for large language and vision-language models on the Hugging Face stack.

The public names below are imported on first use (``from llmkd import DistillTrainer`` works as usual), so that
``import llmkd`` and ``llmkd --help`` stay fast: importing a trainer brings in torch, transformers, TRL and peft.
Importing ``DualHeadModel`` / ``DualHeadConfig`` (or anything of DHO) registers the dual-head model with the
transformers Auto classes; loading a model through llmkd does it too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "DistillConfig": "llmkd.config",
    "DistillTrainer": "llmkd.trainers.base",
    "TAIDConfig": "llmkd.trainers.taid",
    "TAIDTrainer": "llmkd.trainers.taid",
    "SinKDConfig": "llmkd.trainers.sinkd",
    "SinKDTrainer": "llmkd.trainers.sinkd",
    # DHO (importing registers DualHeadModel with the transformers Auto classes)
    "DualHeadConfig": "llmkd.models.dual_head",
    "DualHeadModel": "llmkd.models.dual_head",
    "DHOConfig": "llmkd.trainers.dho",
    "DHOTrainer": "llmkd.trainers.dho",
    # MoE mimic + preference distillation (LLaVA-MoD)
    "upcycle_to_moe": "llmkd.models.moe",
    "MoEMimicConfig": "llmkd.trainers.moe",
    "MoEMimicTrainer": "llmkd.trainers.moe",
    "PreferenceDistillConfig": "llmkd.trainers.preference",
    "PreferenceDistillTrainer": "llmkd.trainers.preference",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'llmkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .config import DistillConfig
    from .models.dual_head import DualHeadConfig, DualHeadModel
    from .models.moe import upcycle_to_moe
    from .trainers.base import DistillTrainer
    from .trainers.dho import DHOConfig, DHOTrainer
    from .trainers.moe import MoEMimicConfig, MoEMimicTrainer
    from .trainers.preference import PreferenceDistillConfig, PreferenceDistillTrainer
    from .trainers.sinkd import SinKDConfig, SinKDTrainer
    from .trainers.taid import TAIDConfig, TAIDTrainer
