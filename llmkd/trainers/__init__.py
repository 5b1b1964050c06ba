"""Trainers: thin transformers.Trainer subclasses wiring losses and teacher signals together."""

from .base import DistillTrainer
from .sinkd import SinKDConfig, SinKDTrainer
from .taid import TAIDConfig, TAIDTrainer

__all__ = ["DistillTrainer", "SinKDConfig", "SinKDTrainer", "TAIDConfig", "TAIDTrainer"]

from .dho import DHOConfig, DHOTrainer  # noqa: E402

__all__ += ["DHOConfig", "DHOTrainer"]

from .moe import MoEMimicConfig, MoEMimicTrainer  # noqa: E402
from .preference import PreferenceDistillConfig, PreferenceDistillTrainer  # noqa: E402

__all__ += ["MoEMimicConfig", "MoEMimicTrainer", "PreferenceDistillConfig", "PreferenceDistillTrainer"]
