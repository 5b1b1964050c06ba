"""llmkd: knowledge distillation for large language and vision-language models on the Hugging Face stack."""

__version__ = "0.1.0"

from .config import DistillConfig  # noqa: E402
from .trainers import DistillTrainer, SinKDConfig, SinKDTrainer, TAIDConfig, TAIDTrainer  # noqa: E402

__all__ = [
    "DistillConfig", "DistillTrainer", "SinKDConfig", "SinKDTrainer", "TAIDConfig", "TAIDTrainer", "__version__",
]

# DHO (importing registers DualHeadModel with the transformers Auto classes)
from .models.dual_head import DualHeadConfig, DualHeadModel  # noqa: E402
from .trainers.dho import DHOConfig, DHOTrainer  # noqa: E402

__all__ += ["DHOConfig", "DHOTrainer", "DualHeadConfig", "DualHeadModel"]

# MoE mimic + preference distillation (LLaVA-MoD)
from .models.moe import upcycle_to_moe  # noqa: E402
from .trainers.moe import MoEMimicConfig, MoEMimicTrainer  # noqa: E402
from .trainers.preference import PreferenceDistillConfig, PreferenceDistillTrainer  # noqa: E402

__all__ += ["MoEMimicConfig", "MoEMimicTrainer", "PreferenceDistillConfig", "PreferenceDistillTrainer", "upcycle_to_moe"]
