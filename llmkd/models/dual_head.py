"""The DHO student (docs/ALGORITHMS.md section 4): a vision backbone ``g`` with two linear heads, ``h_ce`` (trained on
labels) and ``h_kd`` (trained on the teacher), combined at inference as

    p = alpha * softmax(h_ce(z)) + (1 - alpha) * softmax(h_kd(z) / beta),     z = g(x)

:class:`DualHeadModel` is a ``transformers.PreTrainedModel`` with its own config (:class:`DualHeadConfig`,
``model_type = "llmkd_dual_head"``) registered with ``AutoConfig``, ``AutoModel`` and
``AutoModelForImageClassification``: once ``llmkd`` is imported, ``AutoModelForImageClassification.from_pretrained``
loads a saved student (no remote code), and ``pipeline("image-classification", model=...)`` serves it. ``alpha`` and
``beta`` live in the config, so they are saved in ``config.json`` with every checkpoint.

The backbone is any transformers vision model (CLIP vision tower, ViT, ResNet, MobileNetV2, ConvNeXt, ...), built
from its config (``DualHeadConfig(backbone_config=ResNetConfig(...))``) or loaded by name
(:meth:`DualHeadModel.from_backbone`). Its pooled features ``z`` (B, D) feed both heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.23 (vLLM's CPU build pins 5.19): DHO is unavailable there, the rest works
    SubConfigSpec = None
from transformers.utils import ModelOutput

FEATURE_POOLINGS = ("auto", "pooler", "cls", "mean")
#: the paper's grid (docs/ALGORITHMS.md section 4): alpha in 0..1 step 0.05, beta in {0.5, ..., 4}
DEFAULT_ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_BETA_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
#: without a validation split (zero-shot teacher)
DEFAULT_ALPHA, DEFAULT_BETA = 0.4, 0.5


class DualHeadConfig(PreTrainedConfig):
    r"""Configuration of :class:`DualHeadModel`.

    Args:
        backbone_config: the vision backbone's config (a ``PreTrainedConfig`` or its dict); a ``CLIPConfig`` is
            replaced by its ``vision_config``. Default: a ResNet-18 shape.
        feature_pooling: how the backbone's output becomes ``z`` (B, D): ``auto`` (its ``pooler_output`` when it
            has one, else the first token of a (B, S, D) output or the spatial mean of a (B, D, H, W) one),
            ``pooler``, ``cls`` (first token, as ``ViTForImageClassification`` does) or ``mean``.
        feature_size: ``D``; measured once with a dummy image when left None.
        alpha / beta: the inference weights (defaults 0.4 / 0.5, the paper's choice without a validation split).
        num_labels / id2label / label2id: the classes, as for any transformers classifier.
    """

    model_type = "llmkd_dual_head"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="resnet",
            init_kwargs={"layer_type": "basic", "depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512]},
        ),
    } if SubConfigSpec is not None else {}

    backbone_config: dict | PreTrainedConfig | None = None
    feature_pooling: str = "auto"
    feature_size: int | None = None
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            import transformers

            raise ImportError(f"DHO's DualHeadConfig needs transformers >= 5.23 (sub-config defaults), and this "
                              f"environment has {transformers.__version__} (vLLM's CPU build pins < 5.20). Use an "
                              "environment without vLLM for DHO.")
        super().__post_init__(**kwargs)
        if getattr(self.backbone_config, "model_type", None) == "clip":
            self.backbone_config = self.backbone_config.vision_config
        if self.feature_pooling not in FEATURE_POOLINGS:
            raise ValueError(f"feature_pooling={self.feature_pooling!r} is not one of {FEATURE_POOLINGS}.")
        check_inference_weights(self.alpha, self.beta)


def check_inference_weights(alpha: float, beta: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the CE head's share of the prediction), got {alpha}.")
    if not float(beta) > 0.0:
        raise ValueError(f"beta must be > 0 (the KD head's temperature at inference), got {beta}.")


@dataclass
class DualHeadOutput(ModelOutput):
    """Output of :class:`DualHeadModel`.

    Attributes:
        loss: the negative log-likelihood of the combined prediction (when ``labels`` are given).
        logits: ``(B, C)`` ``log p``, the log of the combined prediction; ``softmax(logits) = p`` and
            ``argmax(logits)`` is the predicted class.
        ce_logits / kd_logits: ``(B, C)`` the two heads' raw logits.
        features: ``(B, D)`` the pooled backbone features ``z``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    ce_logits: torch.Tensor | None = None
    kd_logits: torch.Tensor | None = None
    features: torch.Tensor | None = None


def combine_head_predictions(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float,
                             beta: float) -> torch.Tensor:
    """``log(alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta))``, in float32.

    Args:
        ce_logits / kd_logits: ``(..., C)``.
    Returns:
        ``(..., C)`` log-probabilities (a log-sum-exp of the two weighted log-softmaxes; ``alpha`` = 0 or 1 give
        exactly one head).
    """
    check_inference_weights(alpha, beta)
    log_ce = torch.log_softmax(ce_logits.float(), dim=-1)
    log_kd = torch.log_softmax(kd_logits.float() / beta, dim=-1)
    if alpha == 1.0:
        return log_ce
    if alpha == 0.0:
        return log_kd
    return torch.logaddexp(log_ce + math.log(alpha), log_kd + math.log1p(-alpha))


@dataclass
class InferenceWeights:
    """The result of :func:`search_inference_weights`: the chosen ``alpha``, ``beta``, their accuracy and mean
    negative log-likelihood on the searched split, and the accuracy of every grid point ``(len(alphas),
    len(betas))``."""

    alpha: float
    beta: float
    accuracy: float
    nll: float
    accuracies: torch.Tensor


@torch.no_grad()
def search_inference_weights(ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor,
                             alphas=DEFAULT_ALPHA_GRID, betas=DEFAULT_BETA_GRID) -> InferenceWeights:
    """Grid-search ``alpha`` and ``beta`` for the highest accuracy of the combined prediction.

    Give it a VALIDATION split's logits only: whatever it is given is what the weights are fitted to. Ties in
    accuracy (frequent on small splits) go to the lower mean negative log-likelihood of the true class, then to the
    first point in grid order (alphas outer, betas inner).

    Args:
        ce_logits / kd_logits: ``(N, C)``.
        labels: ``(N,)`` class ids in ``[0, C)``.
    """
    if ce_logits.shape != kd_logits.shape or ce_logits.dim() != 2:
        raise ValueError(f"ce_logits {tuple(ce_logits.shape)} and kd_logits {tuple(kd_logits.shape)} must both be "
                         "(N, C).")
    if labels.shape != ce_logits.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) with N = {ce_logits.shape[0]}.")
    if ce_logits.shape[0] == 0:
        raise ValueError("Cannot search alpha/beta on an empty split: give a validation split with labeled rows.")
    alphas, betas = [float(a) for a in alphas], [float(b) for b in betas]
    if not alphas or not betas:
        raise ValueError("The alpha and beta grids must not be empty.")
    labels = labels.long()
    accuracies = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    best = None
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            log_p = combine_head_predictions(ce_logits, kd_logits, alpha, beta)
            accuracy = (log_p.argmax(-1) == labels).double().mean().item()
            nll = -log_p.gather(-1, labels[:, None]).double().mean().item()
            accuracies[i, j] = accuracy
            if best is None or accuracy > best[0] or (accuracy == best[0] and nll < best[1]):
                best = (accuracy, nll, alpha, beta)
    accuracy, nll, alpha, beta = best
    return InferenceWeights(alpha=alpha, beta=beta, accuracy=accuracy, nll=nll, accuracies=accuracies)


class DualHeadPreTrainedModel(PreTrainedModel):
    config_class = DualHeadConfig
    base_model_prefix = "dual_head"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class DualHeadModel(DualHeadPreTrainedModel):
    """A vision backbone with a CE head and a KD head; its forward returns the combined prediction.

    Example::

        from transformers import ResNetConfig
        model = DualHeadModel(DualHeadConfig(backbone_config=ResNetConfig(...), num_labels=10))
        model = DualHeadModel.from_backbone("microsoft/resnet-18", num_labels=1000)  # pretrained backbone
        out = model(pixel_values)            # out.logits = log p (B, C); out.ce_logits, out.kd_logits (B, C)
        model.set_inference_weights(alpha=0.3, beta=1.5)
    """

    def __init__(self, config: DualHeadConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        # gradient checkpointing is the backbone's (the heads are single linear layers)
        self.supports_gradient_checkpointing = bool(getattr(self.backbone, "supports_gradient_checkpointing", False))
        if config.feature_size is None:
            config.feature_size = self._measure_feature_size()
        self.ce_head = nn.Linear(config.feature_size, config.num_labels)
        self.kd_head = nn.Linear(config.feature_size, config.num_labels)
        self.post_init()

    @classmethod
    def from_backbone(cls, name_or_path: str, num_labels: int | None = None, *, id2label: dict | None = None,
                      alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, feature_pooling: str = "auto",
                      pretrained: bool = True, **load_kwargs) -> DualHeadModel:
        """A student whose backbone is the vision model ``name_or_path`` (its pretrained weights, or fresh ones
        from its config with ``pretrained=False``) and whose two heads are new. A CLIP checkpoint gives its vision
        tower; a classifier checkpoint gives its base model (its own head is dropped)."""
        backbone_config = AutoConfig.from_pretrained(name_or_path, **load_kwargs)
        if backbone_config.model_type == "clip":
            from transformers import CLIPVisionModel

            backbone_config = backbone_config.vision_config
            backbone = CLIPVisionModel.from_pretrained(name_or_path, **load_kwargs) if pretrained else None
        elif pretrained:
            backbone = AutoModel.from_pretrained(name_or_path, **load_kwargs)
        else:
            backbone = None
        if id2label is not None:
            id2label = {int(k): v for k, v in id2label.items()}
            num_labels = len(id2label) if num_labels is None else num_labels
        if num_labels is None:
            raise ValueError("from_backbone needs num_labels (or id2label): the number of classes of the task.")
        extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}
        config = DualHeadConfig(backbone_config=backbone.config if backbone is not None else backbone_config,
                                num_labels=num_labels, alpha=alpha, beta=beta, feature_pooling=feature_pooling,
                                **extra)
        return cls(config, backbone=backbone)

    # ---------------------------------------------------------------------------------------------- features
    @torch.no_grad()
    def _measure_feature_size(self) -> int:
        backbone_config = self.backbone.config
        size = getattr(backbone_config, "image_size", None) or 224
        size = size if isinstance(size, int) else int(size[0])
        channels = getattr(backbone_config, "num_channels", 3)
        parameter = next(self.backbone.parameters())
        training = self.backbone.training
        self.backbone.eval()
        dummy = torch.zeros(1, channels, size, size, dtype=parameter.dtype, device=parameter.device)
        features = self._pool(self.backbone(pixel_values=dummy))
        self.backbone.train(training)
        return int(features.shape[-1])

    def _pool(self, outputs) -> torch.Tensor:
        pooling = self.config.feature_pooling
        pooled = getattr(outputs, "image_embeds", None)
        if pooled is None:
            pooled = getattr(outputs, "pooler_output", None)
        if pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)
        if pooling == "pooler":
            raise ValueError(f"feature_pooling='pooler' but {type(self.backbone).__name__} returns no "
                             "pooler_output: use 'cls' or 'mean'.")
        hidden = outputs.last_hidden_state
        if hidden.dim() == 4:  # (B, D, H, W) feature map
            if pooling == "cls":
                raise ValueError(f"feature_pooling='cls' needs a (B, S, D) token output; "
                                 f"{type(self.backbone).__name__} returns a (B, D, H, W) feature map: use 'mean'.")
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if pooling in ("auto", "cls") else hidden.mean(dim=1)

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``z = g(x)``: ``pixel_values`` (B, 3, H, W) -> (B, D)."""
        return self._pool(self.backbone(pixel_values=pixel_values))

    # ------------------------------------------------------------------------------------------- inference
    def set_inference_weights(self, alpha: float, beta: float) -> None:
        """Set (and check) the weights the forward combines the heads with; saved with the config."""
        check_inference_weights(alpha, beta)
        self.config.alpha, self.config.beta = float(alpha), float(beta)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> DualHeadOutput:
        """Args:
            pixel_values: ``(B, 3, H, W)``.
            labels: ``(B,)`` optional class ids; the loss is the NLL of the combined prediction.
        """
        features = self.extract_features(pixel_values)
        ce_logits = self.ce_head(features)
        kd_logits = self.kd_head(features)
        logits = combine_head_predictions(ce_logits, kd_logits, self.config.alpha, self.config.beta)
        loss = None if labels is None else F.nll_loss(logits, labels.to(logits.device).long())
        output = DualHeadOutput(loss=loss, logits=logits, ce_logits=ce_logits, kd_logits=kd_logits,
                                features=features)
        return output if return_dict is not False else output.to_tuple()


AutoConfig.register(DualHeadConfig.model_type, DualHeadConfig, exist_ok=True)
AutoModel.register(DualHeadConfig, DualHeadModel, exist_ok=True)
AutoModelForImageClassification.register(DualHeadConfig, DualHeadModel, exist_ok=True)

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_ALPHA_GRID", "DEFAULT_BETA", "DEFAULT_BETA_GRID", "DualHeadConfig", "DualHeadModel",
    "DualHeadOutput", "InferenceWeights", "combine_head_predictions", "search_inference_weights",
]
