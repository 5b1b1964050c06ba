"""The DHO teacher: a CLIP zero-shot classifier built from class names and prompt templates (docs/ALGORITHMS.md
section 4), for any ``CLIPModel`` checkpoint with its tokenizer and image processor.

    logits = logit_scale * cos(image_embedding, class_embedding_c)        (logit_scale = 100 by default)
    class_embedding_c = normalise(mean_t normalise(text_embedding(template_t.format(name_c))))

Only the vision tower and its projection are kept after the class embeddings are computed (the text tower is not
needed to classify images). Any ``transformers`` image classifier can stand in for it: the DHO trainer reads
``teacher(pixel_values=...).logits`` either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

#: CLIP's single default prompt
DEFAULT_TEMPLATES = ("a photo of a {}.",)
#: the 7-template ensemble OpenAI selected for ImageNet (CLIP's "Prompt_Engineering_for_ImageNet" notebook)
IMAGENET_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)


def _pooled(output) -> torch.Tensor:
    """``get_text_features`` / ``get_image_features`` return the projected pooled output (transformers 5) or a
    tensor (older releases)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def check_prompts(class_names, templates) -> tuple[list[str], list[str]]:
    class_names = [str(name) for name in (class_names or [])]
    templates = [str(template) for template in (templates or [])]
    if not class_names:
        raise ValueError("The CLIP zero-shot teacher needs class names (one per label id, in label order): set "
                     "class_names, or use a dataset whose label column is a ClassLabel with names.")
    if any(not name.strip() for name in class_names):
        raise ValueError(f"Class names must not be empty, got {class_names}.")
    if not templates:
        raise ValueError("The CLIP zero-shot teacher needs at least one prompt template such as 'a photo of a {}.'.")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"Each prompt template must hold exactly one '{{}}' where the class name goes; these do "
                         f"not: {bad}.")
    return class_names, templates


@torch.no_grad()
def clip_class_embeddings(clip_model, tokenizer, class_names, templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """The zero-shot classifier's weights ``(C, D)``: per class, the normalised mean of the normalised text
    embeddings of every template filled with the class name."""
    class_names, templates = check_prompts(class_names, templates)
    device = next(clip_model.parameters()).device
    embeddings = []
    for name in class_names:
        texts = [template.format(name) for template in templates]
        tokens = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        text = _pooled(clip_model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens.get("attention_mask"))).float()  # (T, D)
        embeddings.append(F.normalize(F.normalize(text, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(embeddings)


class CLIPZeroShotClassifier(nn.Module):
    """A frozen CLIP image classifier over ``class_names``: ``forward(pixel_values (B, 3, H, W))`` returns an
    ``ImageClassifierOutput`` whose ``logits`` are ``(B, C)``.

    Build it with :meth:`from_pretrained` (a checkpoint name or path, with its tokenizer) or :meth:`from_model`.
    ``logit_scale`` is 100 (the paper's teacher, and CLIP's trained scale); None uses the model's own
    ``logit_scale.exp()``.
    """

    def __init__(self, clip_model, class_embeddings: torch.Tensor, logit_scale: float | None = 100.0,
                 class_names=None):
        super().__init__()
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection
        self.config = clip_model.config
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone(), persistent=False)
        scale = float(clip_model.logit_scale.detach().exp()) if logit_scale is None else float(logit_scale)
        if scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {scale}.")
        self.logit_scale = scale
        self.class_names = list(class_names) if class_names is not None else None
        self.eval().requires_grad_(False)

    @property
    def num_labels(self) -> int:
        return int(self.class_embeddings.shape[0])

    @classmethod
    def from_model(cls, clip_model, tokenizer, class_names, templates=DEFAULT_TEMPLATES,
                   logit_scale: float | None = 100.0) -> CLIPZeroShotClassifier:
        embeddings = clip_class_embeddings(clip_model, tokenizer, class_names, templates)
        return cls(clip_model, embeddings, logit_scale=logit_scale, class_names=class_names)

    @classmethod
    def from_pretrained(cls, name_or_path: str, class_names, templates=DEFAULT_TEMPLATES,
                        logit_scale: float | None = 100.0, tokenizer=None, dtype: torch.dtype | str = "auto",
                        device: str | torch.device | None = None, **load_kwargs) -> CLIPZeroShotClassifier:
        """Load a ``CLIPModel`` checkpoint (and its tokenizer unless given) and build the classifier."""
        from transformers import AutoTokenizer, CLIPModel

        clip_model = CLIPModel.from_pretrained(name_or_path, dtype=dtype, **load_kwargs)
        if device is not None:
            clip_model.to(device)
        clip_model.eval()
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **{k: v for k, v in load_kwargs.items()
                                                                       if k in ("revision", "cache_dir")})
        return cls.from_model(clip_model, tokenizer, class_names, templates, logit_scale)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> ImageClassifierOutput:
        """``pixel_values`` ``(B, 3, H, W)`` -> ``logits`` ``(B, C)`` = ``logit_scale * cos(image, class)``."""
        parameter = self.visual_projection.weight
        pooled = self.vision_model(pixel_values=pixel_values.to(parameter.device, parameter.dtype)).pooler_output
        image = F.normalize(self.visual_projection(pooled).float(), dim=-1)  # (B, D)
        logits = self.logit_scale * image @ self.class_embeddings.to(image.device).T
        return ImageClassifierOutput(logits=logits)


__all__ = ["CLIPZeroShotClassifier", "DEFAULT_TEMPLATES", "IMAGENET_TEMPLATES", "check_prompts",
           "clip_class_embeddings"]
