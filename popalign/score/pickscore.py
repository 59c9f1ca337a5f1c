"""PickScore: a CLIP ViT-H-14 fine-tuned on Pick-a-Pic human preferences.

    score_i = exp(logit_scale) * cos(image_embedding_i, text_embedding_i)
"""

from __future__ import annotations

import torch
from PIL import Image

from popalign.score.base import QualityScorer, paired_cosine, resolve_device, resolve_dtype
from popalign.score.hf_clip import TransformersClip


def pick_score(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """score_i = exp(logit_scale) * cos(x_i, t_i); features (B, D), logit_scale a scalar (log of the
    temperature, as stored in CLIPModel). Returns (B,)."""
    return logit_scale.detach().float().exp() * paired_cosine(image_features, text_features)


class PickScoreScorer(QualityScorer):
    """PickScore with a transformers CLIPModel `model` and the CLIPProcessor `processor` it was trained with."""

    name = "pickscore"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 device: str | None = None, dtype: str = "auto", batch_size: int = 8):
        super().__init__(batch_size)
        device_ = resolve_device(device)
        self.clip = TransformersClip(model, processor, device_, resolve_dtype(dtype, device_))
        self.description = f"PickScore = exp(logit_scale) * cos, {model} (processor {processor})"

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return pick_score(self.clip.image_features(images), self.clip.text_features(prompts), self.clip.model.logit_scale).cpu()
