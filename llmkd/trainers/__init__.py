"""Trainers: thin transformers.Trainer subclasses wiring losses and teacher signals together."""

from .base import DistillTrainer

__all__ = ["DistillTrainer"]
