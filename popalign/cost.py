"""What a real run costs: FLOPs counted with torch's FLOP counter on the meta device (the real architectures,
no weights), the images and steps the recipe's defaults imply, and GPU-hours as labelled estimates.

    python -m popalign.cost            prints docs/cost.md's tables

Every GPU-hour figure is an estimate: FLOPs / (peak dense bf16 FLOP/s x utilisation). The FLOP counts are
measured (torch.utils.flop_counter counts matrix multiplications and convolutions, 2 FLOP per
multiply-add; normalisations and activations are not counted, a few percent at most).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from typing import Sequence

from popalign.architectures import (CLIP_TEXT_H, CLIP_TEXT_L, IMAGE_REWARD_TOKENS, MODELS, TEXT_ENCODERS, VAE, VISION_H14, VISION_L14,
                                    VISION_L16)
from popalign.recipe import Recipe

# Dense bf16 tensor-core peak, SXM parts, without sparsity (vendor data sheets).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
UTILISATION = 0.4  # the share of peak a well-batched diffusion workload reaches: an assumption, stated as such


def count_flops(run) -> float:
    """FLOPs of `run()` under torch's FLOP counter (call it on meta-device modules and tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def unet_and_vae(model: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**MODELS[model]["unet"])
        vae = AutoencoderKL(**VAE, sample_size=MODELS[model]["resolution"])
    return unet, vae


@functools.lru_cache(maxsize=None)
def component_flops(model: str, resolution: int | None = None) -> dict[str, float]:
    """Per image at `resolution` (default: the model's native one): one U-Net forward, VAE encode and decode."""
    import torch

    spec = MODELS[model]
    resolution = resolution or spec["resolution"]
    unet, vae = unet_and_vae(model)
    latent = resolution // 8
    meta = {"device": "meta"}
    sample = torch.zeros(1, 4, latent, latent, **meta)
    text = torch.zeros(1, spec["text_tokens"], spec["text_dim"], **meta)
    added = {"text_embeds": torch.zeros(1, spec["pooled_dim"], **meta), "time_ids": torch.zeros(1, 6, **meta)} if spec["pooled_dim"] else None
    timestep = torch.tensor([500], **meta)
    return {
        "unet_parameters": float(sum(parameter.numel() for parameter in unet.parameters())),
        "unet_forward": count_flops(lambda: unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added)),
        "vae_encode": count_flops(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, **meta))),
        "vae_decode": count_flops(lambda: vae.decode(sample)),
    }


def _text_flops(config: dict, tokens: int = 77) -> float:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel._from_config(CLIPTextConfig(**config, max_position_embeddings=77), attn_implementation="eager")
    return count_flops(lambda: model(input_ids=torch.zeros(1, tokens, dtype=torch.long, device="meta")))


def _vision_flops(config: dict) -> float:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel._from_config(CLIPVisionConfig(**config), attn_implementation="eager")
    size = config["image_size"]
    return count_flops(lambda: model(pixel_values=torch.zeros(1, 3, size, size, device="meta")))


def _blip_text_flops() -> float:
    """ImageReward's BERT-base text encoder, cross-attending to BLIP ViT-L/16's 197 image tokens."""
    import torch
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    config = BlipTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, encoder_hidden_size=1024)
    with torch.device("meta"):
        model = BlipTextModel._from_config(config, attn_implementation="eager", add_pooling_layer=False)
    tokens = (VISION_L16["image_size"] // VISION_L16["patch_size"]) ** 2 + 1
    return count_flops(lambda: model(input_ids=torch.zeros(1, IMAGE_REWARD_TOKENS, dtype=torch.long, device="meta"),
                                     encoder_hidden_states=torch.zeros(1, tokens, 1024, device="meta")))


def _vgg_face_flops() -> float:
    """DeepFace's gender and race models are VGG-Face (the VGG-16 layout) at 224x224 with their own heads."""
    import torch
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.vgg16(num_classes=2622)
    return count_flops(lambda: model(torch.zeros(1, 3, 224, 224, device="meta")))


@functools.lru_cache(maxsize=None)
def text_encoder_flops(model: str) -> float:
    """One prompt through the model's text encoder(s), 77 tokens."""
    return sum(_text_flops(config) for config in TEXT_ENCODERS[model])


@functools.lru_cache(maxsize=None)
def reader_flops() -> dict[str, float]:
    """Per image, what reads the generated images: each quality scorer of eval.sh (image tower + the prompt's text
    tower, which a scorer runs once per image) and each classifier (the face detector is not counted: a small CNN).

        clip, aesthetic:     CLIP ViT-L/14 image (+ text for clip; the aesthetic MLP is negligible)
        hpsv2, pickscore:    OpenCLIP ViT-H-14 image + text
        imagereward:         BLIP ViT-L/16 image + BERT-base text with cross-attention
        deepface:            2 x VGG-Face (gender, race) per face
        clip (classifier):   CLIP ViT-L/14 image (the label prompts are encoded once)
    """
    l14, h14 = _vision_flops(VISION_L14), _vision_flops(VISION_H14)
    text_l, text_h = _text_flops(CLIP_TEXT_L), _text_flops(CLIP_TEXT_H)
    return {"scorer clip": l14 + text_l, "scorer aesthetic": l14, "scorer hpsv2": h14 + text_h, "scorer pickscore": h14 + text_h,
            "scorer imagereward": _vision_flops(VISION_L16) + _blip_text_flops(),
            "classifier deepface": 2 * _vgg_face_flops(), "classifier clip": l14}


def image_flops(unet_forward: float, vae_decode: float, steps: int, guidance: bool) -> float:
    """One generated image: steps x (2 with classifier-free guidance, else 1) U-Net forwards + one VAE decode."""
    return steps * (2 if guidance else 1) * unet_forward + vae_decode


def generated_image_flops(model: str, steps: int, guidance: bool) -> float:
    """One generated image of `model` at its resolution, its prompts included: image_flops plus the text encoders
    for the prompt and, with guidance, the negative prompt (diffusers encodes both for every image)."""
    parts = component_flops(model)
    return image_flops(parts["unet_forward"], parts["vae_decode"], steps, guidance) + (2 if guidance else 1) * text_encoder_flops(model)


def training_step_flops(unet_forward: float, pairs: int, objective: str, with_reference: bool = True,
                        prior_preservation_target: str = "", gradient_checkpointing: bool = False,
                        text_encoder_forward: float = 0.0) -> float:
    """One optimizer step on cached latents. Backward ~ 2 x forward, so the policy costs 3 forwards per sample, 4 with
    gradient checkpointing (the forward is run again in the backward pass); the frozen reference 1 forward per sample
    when the objective uses it. Samples per pair: the objectives table's (popalign.training.objectives: 2 for winner
    and loser, 1 for the winners alone). Prior preservation adds each winner under its identity-specific prompt: the
    policy's forwards once more per pair, and 1 more when its target is the reference's prediction.
    With the text encoders trained (text_encoder_forward > 0: one prompt through them), each pair's caption (and
    winner prompt) is embedded at every step: 3 forwards for the trained encoders, 1 more when a reference pass reads them.

        FLOP = (f s + r) x unet_forward + (3 + [reference]) x c x text_encoder_forward,
               f = 3 (4 with checkpointing), s = samples (+ pairs with prior preservation),
               r = reference forwards (0 without the reference), c = prompts embedded (pairs, x 2 with prior preservation)"""
    from popalign.training.objectives import objective_named

    entry = objective_named(objective)
    samples = pairs * entry.samples_per_pair
    reference = samples if with_reference and entry.uses_reference else 0
    prompts = pairs
    if prior_preservation_target:
        samples += pairs
        prompts += pairs
        reference += pairs if with_reference and prior_preservation_target == "reference" else 0
    policy_forwards = 4 if gradient_checkpointing else 3
    reference_text = with_reference and (entry.uses_reference or prior_preservation_target == "reference")
    text = (3 + (1 if reference_text else 0)) * prompts * text_encoder_forward
    return (policy_forwards * samples + reference) * unet_forward + text


def validation_flops(model: str, images: int, steps: int, guidance: bool, classifier: str = "classifier deepface",
                     scorer: str = "scorer clip") -> float:
    """One validation during training: its images generated (generated_image_flops) and read by the classifier and the
    quality scorer (reader_flops)."""
    readers = reader_flops()
    return images * (generated_image_flops(model, steps, guidance) + readers[classifier] + (readers[scorer] if scorer else 0.0))


def gpu_hours(flops: float, gpu: str, utilisation: float = UTILISATION) -> float:
    """hours = FLOPs / (peak FLOP/s x utilisation) / 3600."""
    return flops / (GPU_PEAK_FLOPS[gpu] * utilisation) / 3600.0


def training_step_rows() -> list[tuple[str, str, str]]:
    """(label, objective, prior-preservation target) rows of the per-step table: the objectives of the table that cost the
    same share one row (named after their members), then the first objective with each prior-preservation target."""
    from popalign.training.objectives import OBJECTIVES

    groups: dict[tuple[int, bool], list[str]] = {}
    for entry in OBJECTIVES.values():
        groups.setdefault((entry.samples_per_pair, entry.uses_reference), []).append(entry.name)
    rows = [(", ".join(names) + ("" if uses_reference else " (no reference)"), names[0], "")
            for (_, uses_reference), names in groups.items()]
    first = next(iter(OBJECTIVES))
    rows += [(f"{first} + prior preservation ({target} target)", first, target) for target in ("noise", "reference")]
    return rows


def stage_flops(model: str, recipe: Recipe) -> list[tuple[str, int, float]]:
    """(stage, images or steps, FLOP) of every stage of the recipe on `model`: the rows of docs/cost.md's stage table."""
    parts = component_flops(model)
    readers = reader_flops()
    per_image = generated_image_flops(model, recipe.steps, recipe.guidance)
    scorers = sum(flops for name, flops in readers.items() if name.startswith("scorer "))
    return [
        ("2 generation (training populations)", recipe.training_images, recipe.training_images * per_image),
        ("2 classification (DeepFace)", recipe.training_images, recipe.training_images * readers["classifier deepface"]),
        ("4 VAE encoding of the pairs' images (once, cached)", recipe.training_images, recipe.training_images * parts["vae_encode"]),
        (f"4 training, PopAlign (policy + reference{', gradient checkpointing' if recipe.gradient_checkpointing else ''})", recipe.train_steps,
         recipe.train_steps * training_step_flops(parts["unet_forward"], recipe.pairs_per_step, "popalign",
                                                  gradient_checkpointing=recipe.gradient_checkpointing)),
        ("5 generation (evaluation, all models)", recipe.evaluation_images, recipe.evaluation_images * per_image),
        ("5 classification and the 5 quality scorers", recipe.evaluation_images,
         recipe.evaluation_images * (readers["classifier deepface"] + scorers)),
    ]


def cost_table(model: str, recipe: Recipe) -> str:
    """The markdown of docs/cost.md: components, then the recipe's stages in FLOPs and GPU-hours."""
    parts = component_flops(model)
    readers = reader_flops()
    text = text_encoder_flops(model)
    per_image = generated_image_flops(model, recipe.steps, recipe.guidance)
    stages = stage_flops(model, recipe)
    total = sum(flops for _, _, flops in stages)
    lines = [f"### {model.upper()} at {MODELS[model]['resolution']}x{MODELS[model]['resolution']} (measured FLOPs)", "",
             "| component | per image |", "|---|---|",
             f"| U-Net parameters | {parts['unet_parameters'] / 1e9:.3f} B |",
             f"| U-Net forward | {parts['unet_forward'] / 1e12:.2f} TFLOP |",
             f"| VAE encode | {parts['vae_encode'] / 1e12:.2f} TFLOP |",
             f"| VAE decode | {parts['vae_decode'] / 1e12:.2f} TFLOP |",
             f"| text encoder{'s' if len(TEXT_ENCODERS[model]) > 1 else ''}, one prompt | {text / 1e12:.3f} TFLOP |",
             f"| generated image ({recipe.steps} steps{', guidance' if recipe.guidance else ''}, decode, prompts) | {per_image / 1e12:.0f} TFLOP |",
             *[f"| {name.replace('scorer ', 'quality scorer ')} | {flops / 1e12:.3f} TFLOP |"
               for name, flops in readers.items()],
             "", f"### The recipe's stages ({model.upper()}; GPU-hours are estimates at {UTILISATION:.0%} of peak)", "",
             "| stage | images or steps | FLOP | share | " + " | ".join(f"{gpu} GPU-h" for gpu in GPU_PEAK_FLOPS) + " |",
             "|---|---|---|---|" + "---|" * len(GPU_PEAK_FLOPS)]
    for name, count, flops in [*stages, ("total", "", total)]:
        hours = " | ".join(f"{gpu_hours(flops, gpu):,.1f}" for gpu in GPU_PEAK_FLOPS)
        lines.append(f"| {name} | {count:,} | {flops:.2e} | {flops / total:.1%} | {hours} |" if count != ""
                     else f"| **{name}** | | {flops:.2e} | 100% | {hours} |")
    lines += ["", f"### A training step per objective ({model.upper()}, one pair, cached latents)", "",
              "| objective | with the reference pass | policy alone |", "|---|---|---|"]
    for label, objective, target in training_step_rows():
        full = training_step_flops(parts["unet_forward"], 1, objective, True, target)
        alone = training_step_flops(parts["unet_forward"], 1, objective, False, target)
        lines.append(f"| {label} | {full / 1e12:.1f} TFLOP | {alone / 1e12:.1f} TFLOP |")
    lines += ["", *training_options_table(model, recipe), "", *target_width_table(model, recipe)]
    return "\n".join(lines)


def expected_images_per_prompt(accuracies: Sequence[float], target_width: float, start: int, cap: int,
                               confidence: float = 0.95) -> float:
    """Expected images eval.sh's TARGET_INTERVAL_WIDTH rule draws for one identity-specific prompt, exactly (no
    simulation), when model m reads each of its images right with probability accuracies[m], independently, and every
    image shows a face.

    The rule (popalign.evaluate.precision): rounds of n = start, 2 start, 4 start, ... images, at most `cap`; after
    each round every model's k_m right of n gives next_image_count, and the prompt goes on while any model asks for
    more (all models are drawn with the same counts). A round's images extend the last round's, so the joint law of
    (k_1, ..., k_M) is carried from round to round:

        P_n(k) restricted to the states that go on  ->  P_2n(k + j) with j_m ~ Binomial(2n - n, accuracies[m])
        E[images] = sum over rounds n of n x P(the prompt stops at n)
    """
    import numpy as np

    from popalign.evaluate.precision import next_image_count

    if not accuracies or start < 1 or cap < start:
        raise ValueError(f"need at least one model and 1 <= start <= cap, got {len(accuracies)} models, start {start}, cap {cap}")
    if any(not 0.0 <= accuracy <= 1.0 for accuracy in accuracies):
        raise ValueError(f"accuracies must lie in [0, 1], got {list(accuracies)}")

    def binomial(trials: int, probability: float) -> np.ndarray:
        return np.array([math.comb(trials, successes) * probability ** successes * (1 - probability) ** (trials - successes)
                         for successes in range(trials + 1)])

    drawn = start
    joint = binomial(drawn, accuracies[0])
    for accuracy in accuracies[1:]:
        joint = np.multiply.outer(joint, binomial(drawn, accuracy))
    expected = 0.0
    while True:
        wants_more = np.array([next_image_count(drawn, right, drawn, target_width, cap, confidence) > drawn
                               for right in range(drawn + 1)])
        going_on = np.zeros(joint.shape, dtype=bool)
        for axis in range(len(accuracies)):
            going_on |= wants_more.reshape([-1 if position == axis else 1 for position in range(len(accuracies))])
        expected += drawn * float(joint[~going_on].sum())
        if not going_on.any() or float(joint[going_on].sum()) == 0.0:
            return expected
        following = min(cap, 2 * drawn)
        joint = np.where(going_on, joint, 0.0)
        for axis, accuracy in enumerate(accuracies):  # each model's new images: a binomial added along its axis
            step = binomial(following - drawn, accuracy)
            moved = np.moveaxis(joint, axis, -1)
            grown = np.zeros(moved.shape[:-1] + (following + 1,))
            for right in range(drawn + 1):
                grown[..., right:right + len(step)] += moved[..., right, None] * step
            joint = np.moveaxis(grown, -1, axis)
        drawn = following


TARGET_WIDTHS = (0.2, 0.1, 0.05)
IDENTITY_ACCURACIES = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)


def run_share_with_target_width(model: str, recipe: Recipe, images_per_identity_prompt: float) -> float:
    """The recipe's FLOPs (every stage) when evaluation draws `images_per_identity_prompt` images for each
    identity-specific prompt instead of the fixed count, as a share of the recipe's."""
    shipped = sum(flops for _, _, flops in stage_flops(model, recipe))
    adaptive = dataclasses.replace(recipe, eval_images_per_identity_prompt=images_per_identity_prompt)
    return sum(flops for _, _, flops in stage_flops(model, adaptive)) / shipped


def target_width_table(model: str, recipe: Recipe, widths: Sequence[float] = TARGET_WIDTHS,
                       accuracies: Sequence[float] = IDENTITY_ACCURACIES) -> list[str]:
    """What eval.sh's TARGET_INTERVAL_WIDTH leaves of the recipe, by the identity accuracy of the models evaluated
    (each of the recipe's eval_models at that accuracy): expected images per identity-specific prompt and the share of
    the whole run's FLOPs."""
    start, cap = recipe.eval_min_images_per_identity_prompt, recipe.eval_images_per_identity_prompt
    lines = [f"### TARGET_INTERVAL_WIDTH by identity accuracy ({model.upper()}; rounds from {start} images, doubling, at most {cap}; "
             f"{recipe.eval_models} models)", "",
             "| identity accuracy | " + " | ".join(f"TARGET_INTERVAL_WIDTH={width}: images per prompt, share of the run"
                                                 for width in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for accuracy in accuracies:
        cells = []
        for width in widths:
            images = expected_images_per_prompt([accuracy] * recipe.eval_models, width, start, cap)
            cells.append(f"{images:.0f}, {run_share_with_target_width(model, recipe, images):.0%}")
        lines.append(f"| {accuracy:.0%} | " + " | ".join(cells) + " |")
    return lines


VALIDATION_EXAMPLE_OCCUPATIONS = 10  # the options table's example: held-out occupations drawn at every validation


def training_options_table(model: str, recipe: Recipe) -> list[str]:
    """What step 4's options add to the recipe's training (each off by default): the text encoders trained with LoRA, and
    validation during training on VALIDATION_EXAMPLE_OCCUPATIONS neutral prompts with their identity-specific ones."""
    parts = component_flops(model)
    forward, pairs = parts["unet_forward"], recipe.pairs_per_step
    plain = training_step_flops(forward, pairs, "popalign", gradient_checkpointing=recipe.gradient_checkpointing)
    with_text = training_step_flops(forward, pairs, "popalign", gradient_checkpointing=recipe.gradient_checkpointing,
                                    text_encoder_forward=text_encoder_flops(model))
    validations = recipe.train_steps // recipe.validation_steps + 1 + (1 if recipe.train_steps % recipe.validation_steps else 0)  # 0, every N, the last
    images = VALIDATION_EXAMPLE_OCCUPATIONS * (recipe.num_validation_images + recipe.identities * recipe.num_validation_identity_images)
    validation = validations * validation_flops(model, images, recipe.validation_num_inference_steps, recipe.validation_guidance)
    training = recipe.train_steps * plain
    rows = [("text encoders trained with LoRA (TRAIN_TEXT_ENCODER=on)", recipe.train_steps, recipe.train_steps * (with_text - plain)),
            (f"validation at step 0, every {recipe.validation_steps} steps and the last ({validations} x {images:,} images: "
             f"{VALIDATION_EXAMPLE_OCCUPATIONS} occupations x ({recipe.num_validation_images} neutral + {recipe.identities} x "
             f"{recipe.num_validation_identity_images} identity-specific), {recipe.validation_num_inference_steps} steps, DeepFace, CLIP score)",
             validations * images, validation)]
    lines = [f"### Step 4's options ({model.upper()}; added to the training row above)", "",
             "| option | steps or images | FLOP | x the training's | H100 GPU-h |", "|---|---|---|---|---|"]
    for name, count, flops in rows:
        lines.append(f"| {name} | {count:,} | {flops:.2e} | {flops / training:.2f} | {gpu_hours(flops, 'H100'):,.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sdxl,sd15", help="sdxl, sd15")
    parser.add_argument("--processes", type=int, default=8, help="GPUs of the training run (pairs per step = batch x accumulation x GPUs)")
    args = parser.parse_args(argv)
    recipe = Recipe.from_repository(processes=args.processes)
    print(f"Recipe (from the repository's files and shell defaults, {args.processes} GPUs): {recipe}")
    print()
    for model in args.models.split(","):
        print(cost_table(model.strip(), recipe))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
