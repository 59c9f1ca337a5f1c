"""A transformers CLIP model and processor, and its projected image / text features.

Shared by the PickScore, CLIP-score and aesthetic scorers.
"""

from __future__ import annotations

import torch
from PIL import Image

from popalign.score.base import projected_features


class TransformersClip:
    """`CLIPModel.from_pretrained(model)` with `CLIPProcessor.from_pretrained(processor or model)`, in eval mode."""

    def __init__(self, model: str, processor: str | None, device: torch.device, dtype: torch.dtype):
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.dtype = device, dtype
        self.model = CLIPModel.from_pretrained(model).to(device, dtype).eval()
        self.processor = CLIPProcessor.from_pretrained(processor or model)
        self.max_text_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, D) projected image embeddings (not normalised)."""
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        return projected_features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """(B, D) projected text embeddings (not normalised); prompts longer than the model's
        context are truncated, as CLIP was trained."""
        tokens = self.processor(text=list(prompts), padding=True, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt")
        return projected_features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                               attention_mask=tokens["attention_mask"].to(self.device)))
