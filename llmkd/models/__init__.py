"""Model builders: MoE upcycling of dense decoders, the dual-head (DHO) student."""

from .clip_teacher import CLIPZeroShotClassifier  # noqa: E402
from .dual_head import DualHeadConfig, DualHeadModel, search_inference_weights  # noqa: E402
