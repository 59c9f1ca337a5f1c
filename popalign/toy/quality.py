"""The toy quality score: how well a picture shows a clean figure with the prompted occupation.

    quality = (occupation_share + clean + explained_share) / 3, in [0, 1]

occupation_share: share of the border pixels whose nearest background colour is the prompted
occupation's; clean: 1 if a clean figure was found, else 0; explained_share: share of pixels that
are background or a skin/clothing colour of the toy palette (popalign.toy.world.read_figure).
A prompt that names no occupation of the toy world scores occupation_share = 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from popalign.score.base import QualityScorer
from popalign.toy.classifier import toy_world_paths
from popalign.toy.world import FigureReading, load_world, read_figure


def toy_quality(reading: FigureReading, occupation: str | None) -> float:
    """quality = (occupation_share + clean + explained_share) / 3 of one read picture; see the module docstring.

    `occupation`: the prompted occupation (None when the prompt names none: occupation_share = 0).
    """
    background = reading.occupation_votes.get(occupation, 0.0) if occupation else 0.0
    return (background + float(reading.clean) + reading.explained_share) / 3.0


class ToyQualityScorer(QualityScorer):
    name = "toy"
    description = "toy quality: (prompted-occupation background share + clean figure + palette-explained share) / 3"

    def __init__(self, occupations: str | Path | None = None, attributes: str | Path | None = None, batch_size: int = 64):
        super().__init__(batch_size)
        self.world = load_world(*toy_world_paths(occupations, attributes))

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        scores = [toy_quality(read_figure(self.world, image), self.world.occupation_in_prompt(prompt))
                  for image, prompt in zip(images, prompts)]
        return torch.tensor(scores, dtype=torch.float32)
