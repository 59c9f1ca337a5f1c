"""The quality-scorer interface: one float per (image, prompt) pair, computed in batches."""

from __future__ import annotations

import abc

import torch
from PIL import Image

# dtype option -> torch dtype; "auto" is float16 on a GPU and float32 on the CPU (CPU half
# precision is slow and some CPU kernels lack it).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` -> the first GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def projected_features(features) -> torch.Tensor:
    """The projected embedding from CLIPModel.get_image_features / get_text_features.

    transformers 5 returns a model output holding it as `pooler_output`; transformers 4 returned
    the tensor itself.
    """
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class QualityScorer(abc.ABC):
    """Scores how good an image is for its prompt; higher is better.

    The model is loaded once, in the constructor. `name` is the registry name (it names the output
    file quality_<name>.csv); `description` says exactly which model and formula produced the
    numbers, because scores of different checkpoints (HPSv2.0 vs 2.1, CLIP ViT-B vs ViT-L) are
    not comparable.
    """

    name: str
    description: str

    def __init__(self, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One score per (image, prompt) pair, in the order given, computed `batch_size` pairs at a time."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            batch_scores = self.score_batch(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
            scores.extend(float(value) for value in batch_scores.reshape(-1).tolist())
        return scores

    @abc.abstractmethod
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores of one batch: a (B,) float tensor for B (image, prompt) pairs."""


def paired_cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image with its own prompt (the diagonal of the similarity matrix).

        cos_i = <x_i, t_i> / (|x_i| |t_i|)

    image_features: (B, D) x_i; text_features: (B, D) t_i. Returns (B,) in float32.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(f"feature shapes differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    images = torch.nn.functional.normalize(image_features.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return (images * texts).sum(dim=-1)
