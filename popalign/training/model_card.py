"""The model card (README.md) of a finished run, written with diffusers' model-card helpers.

It records the base model, the objective and every training setting, and what the pairs file held. Its
"Evaluation" section says "not evaluated yet" until popalign.evaluate reports on these weights; then it holds
the report's headline rows (update_evaluation_section).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from popalign.io import atomic_write_text
from popalign.training.checkpoints import training_settings
from popalign.training.objectives import OBJECTIVES

MODEL_CARD_NAME = "README.md"
EVALUATION_HEADING = "## Evaluation"
NOT_EVALUATED = "Not evaluated yet: run eval.sh with TUNED_MODELS pointing at these weights; the headline appears here."


def pairs_statistics(pairs_file: str | Path) -> dict[str, object]:
    """What the pairs file holds: rows, distinct captions and images, and the populations' mean distinct identities."""
    pairs = pd.read_csv(pairs_file, dtype=str, keep_default_na=False)
    statistics: dict[str, object] = {"pairs": len(pairs)}
    for column, name in (("caption", "distinct captions"), ("winner_path", "distinct winner images"), ("loser_path", "distinct loser images")):
        if column in pairs.columns:
            statistics[name] = int(pairs[column].nunique())
    for column in ("diverse_distinct_genders", "diverse_distinct_races", "base_distinct_genders", "base_distinct_races"):
        if column in pairs.columns:
            values = pd.to_numeric(pairs[column], errors="coerce")
            if values.notna().any():
                statistics[f"mean {column.replace('_', ' ')}"] = round(float(values.mean()), 3)
    return statistics


def model_card_text(settings: dict, pairs: dict[str, object], weights: Path, global_step: int, kind: str) -> str:
    """The card's description: objective, loading snippet, pairs, settings, evaluation placeholder."""
    lora = settings.get("lora_rank", 0) > 0
    pipeline_class = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    base = settings["pretrained_model"]
    if lora:
        load = (f"pipeline = {pipeline_class}.from_pretrained(\"{base}\", torch_dtype=torch.float16)\n"
                f"pipeline.load_lora_weights(\"{weights.parent}\")")
    else:
        load = (f"unet = UNet2DConditionModel.from_pretrained(\"{weights}\", torch_dtype=torch.float16)\n"
                f"pipeline = {pipeline_class}.from_pretrained(\"{base}\", unet=unet, torch_dtype=torch.float16)")
    trained = [part for part, on in (("the U-Net", settings.get("train_unet", True)), ("the text encoder(s)", settings.get("train_text_encoder", False))) if on]
    how = (f"LoRA of rank {settings['lora_rank']}" if lora else "full fine-tuning")
    rows = "\n".join(f"| `{name}` | `{value}` |" for name, value in sorted(training_settings(settings).items()))
    pair_rows = "\n".join(f"| {name} | {value} |" for name, value in pairs.items())
    return f"""# {OBJECTIVES[settings['loss']].description if settings['loss'] in OBJECTIVES else settings['loss']} fine-tune of {base}

{(lambda text: text[:1].upper() + text[1:])(' and '.join(trained))} of `{base}` fine-tuned with the **{settings['loss']}** objective for {global_step} optimizer steps
({how}), on population preference pairs: for each
identity-neutral caption, a population of images with diverse identities is preferred to the base model's own.

```python
import torch
from diffusers import {pipeline_class}{'' if lora else ', UNet2DConditionModel'}

{load}
```

## Preference pairs

`{settings['pairs_file']}`

| | |
|---|---|
{pair_rows}

## Training settings

| setting | value |
|---|---|
{rows}

{EVALUATION_HEADING}

{NOT_EVALUATED}
"""


def write_model_card(output_dir: str | Path, settings: dict, weights: Path, global_step: int, kind: str) -> Path:
    """<output_dir>/README.md through diffusers' load_or_create_model_card and populate_model_card."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    output_dir = Path(output_dir)
    card = load_or_create_model_card(output_dir.name, from_training=True, base_model=settings["pretrained_model"],
                                     model_description=model_card_text(settings, pairs_statistics(settings["pairs_file"]), weights,
                                                                       global_step, kind),
                                     license="openrail++" if "stable-diffusion-xl" in settings["pretrained_model"] else None)
    tags = ["text-to-image", "diffusers", "diffusers-training", "popalign", settings["loss"],
            *(["lora"] if settings.get("lora_rank", 0) > 0 else []), "stable-diffusion-xl" if kind == "sdxl" else "stable-diffusion"]
    card = populate_model_card(card, tags=tags)
    path = output_dir / MODEL_CARD_NAME
    atomic_write_text(path, str(card))  # as ModelCard.save writes it, through a temporary file and never through a link
    return path


def update_evaluation_section(card_path: str | Path, markdown: str) -> bool:
    """Replace the card's Evaluation section with `markdown`; False when the file is not such a card."""
    card_path = Path(card_path)
    if not card_path.is_file():
        return False
    text = card_path.read_text(encoding="utf-8")
    if EVALUATION_HEADING not in text:
        return False
    start = text.index(EVALUATION_HEADING) + len(EVALUATION_HEADING)
    following = re.search(r"^## ", text[start:], re.M)
    end = start + following.start() if following else len(text)
    atomic_write_text(card_path, text[:start] + "\n\n" + markdown.strip() + "\n" + ("\n" + text[end:] if following else ""))
    return True
