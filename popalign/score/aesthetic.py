"""LAION improved aesthetic predictor (v2): a linear MLP on the CLIP ViT-L/14 image embedding.

    score_i = MLP(x_i / |x_i|)

with x_i the projected CLIP image embedding (768-d for ViT-L/14) and MLP the stack
Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16)
Linear(16,1) with no activations (dropouts are inactive at evaluation), trained on SAC + LAION
logos + AVA ratings (`sac+logos+ava1-l14-linearMSE.pth`); scores are roughly on a 1-10 scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from popalign.score.base import QualityScorer, resolve_device, resolve_dtype
from popalign.score.checkpoints import load_torch_checkpoint, local_or_hub_file
from popalign.score.hf_clip import TransformersClip

# A copy of the predictor's published weights on the model hub (the original lives in the
# christophschuhmann/improved-aesthetic-predictor GitHub repository).
DEFAULT_WEIGHTS_REPO = "camenduru/improved-aesthetic-predictor"
DEFAULT_WEIGHTS_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor's head. Module indices in `layers` match the published state dict
    (layers.0, .2, .4, .6, .7 are the Linear layers), so the original file loads strictly."""

    def __init__(self, embedding_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings: (B, D) L2-normalised image embeddings -> (B,) scores."""
        return self.layers(embeddings).squeeze(-1)


def aesthetic_score(image_features: torch.Tensor, mlp: AestheticMLP) -> torch.Tensor:
    """score_i = MLP(x_i / |x_i|); image_features (B, D) -> (B,)."""
    normalised = torch.nn.functional.normalize(image_features.float(), dim=-1)
    return mlp(normalised.to(next(mlp.parameters()).dtype)).float()


class AestheticScorer(QualityScorer):
    """LAION aesthetic score: CLIP image embedding from `clip_model`, MLP weights from `weights`.

    `weights` is a local .pth file or an http(s) URL; when None the file `weights_filename` of hub
    repo `weights_repo` is used.
    """

    name = "aesthetic"

    def __init__(self, clip_model: str = "openai/clip-vit-large-patch14", weights: str | None = None,
                 weights_repo: str = DEFAULT_WEIGHTS_REPO, weights_filename: str = DEFAULT_WEIGHTS_FILENAME,
                 device: str | None = None, dtype: str = "auto", batch_size: int = 8):
        super().__init__(batch_size)
        device_ = resolve_device(device)
        self.clip = TransformersClip(clip_model, None, device_, resolve_dtype(dtype, device_))
        if weights is not None and weights.startswith(("http://", "https://")):
            state_dict = torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True)
            weights_name = weights.rsplit("/", 1)[-1]
        else:
            weights_path = local_or_hub_file(weights, weights_repo, weights_filename)
            state_dict = load_torch_checkpoint(weights_path)
            weights_name = Path(weights_path).name
        embedding_dim = self.clip.model.config.projection_dim
        self.mlp = AestheticMLP(embedding_dim)
        self.mlp.load_state_dict(state_dict)
        self.mlp.to(device_).eval()
        self.description = f"LAION aesthetic predictor v2 ({weights_name}) on normalised {clip_model} image embeddings"

    @torch.no_grad()
    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        # The aesthetic score ignores the prompt.
        return aesthetic_score(self.clip.image_features(images), self.mlp).cpu()
