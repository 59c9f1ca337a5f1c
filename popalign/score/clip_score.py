"""CLIP score (Hessel et al. 2021, as torchmetrics defines it) with OpenAI CLIP ViT-L/14.

    score_i = max(100 * cos(image_embedding_i, text_embedding_i), 0)

Not CLIP logits of ViT-B/32, which some papers report under the same name.
"""

from __future__ import annotations

import torch
from PIL import Image

from popalign.score.base import QualityScorer, paired_cosine, resolve_device, resolve_dtype
from popalign.score.hf_clip import TransformersClip


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """score_i = max(100 * cos(x_i, t_i), 0); features (B, D). Returns (B,) in [0, 100]."""
    return (100.0 * paired_cosine(image_features, text_features)).clamp(min=0.0)


class ClipScoreScorer(QualityScorer):
    """CLIP score with a transformers CLIPModel and processor loaded from `model`."""

    name = "clip"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", device: str | None = None, dtype: str = "auto",
                 batch_size: int = 8):
        super().__init__(batch_size)
        device_ = resolve_device(device)
        self.clip = TransformersClip(model, None, device_, resolve_dtype(dtype, device_))
        self.description = f"CLIP score = max(100*cos, 0), {model}"

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return clip_score(self.clip.image_features(images), self.clip.text_features(prompts)).cpu()
