"""Scoring a generated image folder with image-quality scorers (eval.sh): HPSv2, PickScore, CLIP score, LAION
aesthetics, ImageReward. `python -m popalign.score` (__main__.py) is the command line, run.py the folder job, one
module per scorer; a new scorer is one module and one line in SCORERS below.

Scorers are imported only when built, so that choosing one never imports another's heavy
dependencies (ImageReward imports diffusers, datasets and its own BLIP).
"""

from __future__ import annotations

from popalign.score.base import QualityScorer
from popalign.registry import build_registered

# name -> "module:class"; the class is built with the options given to build_scorer.
SCORERS = {
    "hpsv2": "popalign.score.hpsv2:HPSv2Scorer",
    "pickscore": "popalign.score.pickscore:PickScoreScorer",
    "clip": "popalign.score.clip_score:ClipScoreScorer",
    "aesthetic": "popalign.score.aesthetic:AestheticScorer",
    "imagereward": "popalign.score.image_reward:ImageRewardScorer",
    "toy": "popalign.toy.quality:ToyQualityScorer",
}


def build_scorer(name: str, **options) -> QualityScorer:
    """Build the scorer registered under `name` (a key of SCORERS) with its options; the model loads now."""
    return build_registered(SCORERS, name, "quality scorer", **options)


__all__ = ["SCORERS", "QualityScorer", "build_scorer"]
