"""The methods a recipe can name, each a (config class, trainer class) pair, imported lazily."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_path: str
    trainer_path: str

    @staticmethod
    def _resolve(path: str):
        module, attribute = path.rsplit(":", 1)
        return getattr(importlib.import_module(module), attribute)

    @property
    def config_class(self):
        return self._resolve(self.config_path)

    @property
    def trainer_class(self):
        return self._resolve(self.trainer_path)


METHODS: dict[str, MethodEntry] = {
    "kd": MethodEntry("kd", "llmkd.config:DistillConfig", "llmkd.trainers.base:DistillTrainer"),
    "taid": MethodEntry("taid", "llmkd.trainers.taid:TAIDConfig", "llmkd.trainers.taid:TAIDTrainer"),
    "sinkd": MethodEntry("sinkd", "llmkd.trainers.sinkd:SinKDConfig", "llmkd.trainers.sinkd:SinKDTrainer"),
    "moe_mimic": MethodEntry("moe_mimic", "llmkd.trainers.moe:MoEMimicConfig", "llmkd.trainers.moe:MoEMimicTrainer"),
    "preference": MethodEntry("preference", "llmkd.trainers.preference:PreferenceDistillConfig",
                              "llmkd.trainers.preference:PreferenceDistillTrainer"),
    "dho": MethodEntry("dho", "llmkd.trainers.dho:DHOConfig", "llmkd.trainers.dho:DHOTrainer"),
}


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown method {name!r}; available: {sorted(METHODS)}.{hint}")
    return METHODS[name]
