"""Trainers: thin transformers.Trainer subclasses wiring losses and teacher signals together."""

from .base import DistillTrainer
from .taid import TAIDConfig, TAIDTrainer

__all__ = ["DistillTrainer", "TAIDConfig", "TAIDTrainer"]
