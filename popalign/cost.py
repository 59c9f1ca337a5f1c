"""What a real run costs: FLOPs counted with torch's FLOP counter on the meta device (the real architectures,
no weights), the images and steps the recipe's defaults imply, and GPU-hours as labelled estimates.

    python -m popalign.cost            prints docs/cost.md's tables

Every GPU-hour figure is an estimate: FLOPs / (peak dense bf16 FLOP/s x utilisation). The FLOP counts are
measured (torch.utils.flop_counter counts matrix multiplications and convolutions, 2 FLOP per
multiply-add; normalisations and activations are not counted, a few percent at most).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_DEFAULT = re.compile(r'^: "\$\{(?P<name>\w+):?=(?P<value>[^}]*)\}"', re.M)

# The published configurations (diffusers config.json of each checkpoint's unet/ and vae/).
SDXL_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4, layers_per_block=2,
                 mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
                 sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
SD15_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 in_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=4, sample_size=64,
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, in_channels=3, out_channels=3)
MODELS = {"sdxl": {"unet": SDXL_UNET, "resolution": 1024, "text_tokens": 77, "text_dim": 2048, "pooled_dim": 1280},
          "sd15": {"unet": SD15_UNET, "resolution": 512, "text_tokens": 77, "text_dim": 768, "pooled_dim": 0}}
# Dense bf16 tensor-core peak, SXM parts, without sparsity (vendor data sheets).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
UTILISATION = 0.4  # the share of peak a well-batched diffusion workload reaches: an assumption, stated as such


@dataclass(frozen=True)
class Recipe:
    """The counts a run implies. Recipe.from_repository() reads them from the repository's prompt and attribute
    files and the shell scripts' defaults (one home for each)."""

    training_neutral_prompts: int
    identities: int  # gender x race combinations of the attribute file
    images_per_neutral_prompt: int
    images_per_identity_prompt: int
    steps: int
    guidance: bool  # classifier-free guidance: two U-Net passes per step
    train_steps: int
    pairs_per_step: int
    eval_neutral_prompts: int
    eval_identities: int  # identity-specific prompts per evaluation neutral prompt (eval.sh's IDENTITY_RESTRICT applied)
    eval_generic_prompts: int
    eval_images_per_prompt: int
    eval_images_per_identity_prompt: int
    eval_models: int = 2  # the base and one tuned model

    @classmethod
    def from_repository(cls, root: Path = REPO_ROOT, processes: int = 8) -> "Recipe":
        """The original recipe: the repository's data files, the shell scripts' defaults, `processes` GPUs."""
        import pandas as pd

        from popalign.attributes import load_attributes
        from popalign.prompts import parse_restrictions

        attributes = load_attributes(root / "data" / "attributes.json")
        generate, train, evaluate = (shell_defaults((root / name).read_text(encoding="utf-8"))
                                     for name in ("2_generate_images.sh", "4_train.sh", "eval.sh"))
        rows = lambda name: len(pd.read_csv(root / "data" / name, dtype=str, keep_default_na=False))  # noqa: E731
        eval_images_per_prompt = int(evaluate["IMAGES_PER_PROMPT"])
        restricted = parse_restrictions([evaluate["IDENTITY_RESTRICT"]] if evaluate.get("IDENTITY_RESTRICT") else [], attributes)
        eval_identities = 1
        for axis in evaluate["IDENTITY_AXES"].split(","):
            eval_identities *= len(restricted.get(axis, attributes[axis].labels))
        return cls(training_neutral_prompts=rows("training_prompts.csv"),
                   identities=len(attributes["gender"].labels) * len(attributes["race"].labels),
                   images_per_neutral_prompt=int(generate["IMAGES_PER_NEUTRAL_PROMPT"]),
                   images_per_identity_prompt=int(generate["IMAGES_PER_IDENTITY_PROMPT"]),
                   steps=int(generate["STEPS"]), guidance=float(generate["GUIDANCE"]) > 1.0,
                   train_steps=int(train["MAX_TRAIN_STEPS"]),
                   pairs_per_step=int(train["TRAIN_BATCH_SIZE"]) * int(train["GRADIENT_ACCUMULATION_STEPS"]) * processes,
                   eval_neutral_prompts=rows("eval_prompts.csv"), eval_identities=eval_identities, eval_generic_prompts=rows("eval_generic_prompts.csv"),
                   eval_images_per_prompt=eval_images_per_prompt,
                   eval_images_per_identity_prompt=int(evaluate.get("IMAGES_PER_IDENTITY_PROMPT") or eval_images_per_prompt))

    @property
    def training_images(self) -> int:
        identity_prompts = self.training_neutral_prompts * self.identities
        return self.training_neutral_prompts * self.images_per_neutral_prompt + identity_prompts * self.images_per_identity_prompt

    @property
    def evaluation_images(self) -> int:
        per_model = ((self.eval_neutral_prompts + self.eval_generic_prompts) * self.eval_images_per_prompt
                     + self.eval_neutral_prompts * self.eval_identities * self.eval_images_per_identity_prompt)
        return self.eval_models * per_model


def shell_defaults(text: str) -> dict[str, str]:
    """`: "${X:=value}"` lines of a shell script -> {X: value}, for literal values (no variable, no command)."""
    return {match["name"]: match["value"] for match in SHELL_DEFAULT.finditer(text) if "$" not in match["value"]}


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


def image_flops(unet_forward: float, vae_decode: float, steps: int, guidance: bool) -> float:
    """One generated image: steps x (2 with classifier-free guidance, else 1) U-Net forwards + one VAE decode."""
    return steps * (2 if guidance else 1) * unet_forward + vae_decode


def training_step_flops(unet_forward: float, pairs: int, objective: str) -> float:
    """One optimizer step on cached latents. Backward ~ 2 x forward, so the policy costs 3 forwards per sample;
    the frozen reference 1 forward per sample. Samples per pair: winner and loser (popalign, dpo), winner (sft)."""
    samples = pairs * (1 if objective == "sft" else 2)
    reference = 0 if objective == "sft" else samples
    return (3 * samples + reference) * unet_forward


def gpu_hours(flops: float, gpu: str, utilisation: float = UTILISATION) -> float:
    """hours = FLOPs / (peak FLOP/s x utilisation) / 3600."""
    return flops / (GPU_PEAK_FLOPS[gpu] * utilisation) / 3600.0


def cost_table(model: str, recipe: Recipe) -> str:
    """The markdown of docs/cost.md: components, then the recipe's stages in FLOPs and GPU-hours."""
    parts = component_flops(model)
    per_image = image_flops(parts["unet_forward"], parts["vae_decode"], recipe.steps, recipe.guidance)
    stages = [
        ("2 generation (training populations)", recipe.training_images, recipe.training_images * per_image),
        ("4 VAE encoding of the pairs' images (once, cached)", recipe.training_images, recipe.training_images * parts["vae_encode"]),
        ("4 training, PopAlign (policy + reference)", recipe.train_steps,
         recipe.train_steps * training_step_flops(parts["unet_forward"], recipe.pairs_per_step, "popalign")),
        ("5 generation (evaluation, all models)", recipe.evaluation_images, recipe.evaluation_images * per_image),
    ]
    total = sum(flops for _, _, flops in stages)
    lines = [f"### {model.upper()} at {MODELS[model]['resolution']}x{MODELS[model]['resolution']} (measured FLOPs)", "",
             "| component | per image |", "|---|---|",
             f"| U-Net parameters | {parts['unet_parameters'] / 1e9:.3f} B |",
             f"| U-Net forward | {parts['unet_forward'] / 1e12:.2f} TFLOP |",
             f"| VAE encode | {parts['vae_encode'] / 1e12:.2f} TFLOP |",
             f"| VAE decode | {parts['vae_decode'] / 1e12:.2f} TFLOP |",
             f"| generated image ({recipe.steps} steps{', guidance' if recipe.guidance else ''}, decode) | {per_image / 1e12:.0f} TFLOP |",
             "", f"### The recipe's stages ({model.upper()}; GPU-hours are estimates at {UTILISATION:.0%} of peak)", "",
             "| stage | images or steps | FLOP | share | " + " | ".join(f"{gpu} GPU-h" for gpu in GPU_PEAK_FLOPS) + " |",
             "|---|---|---|---|" + "---|" * len(GPU_PEAK_FLOPS)]
    for name, count, flops in [*stages, ("total", "", total)]:
        hours = " | ".join(f"{gpu_hours(flops, gpu):,.1f}" for gpu in GPU_PEAK_FLOPS)
        lines.append(f"| {name} | {count:,} | {flops:.2e} | {flops / total:.1%} | {hours} |" if count != ""
                     else f"| **{name}** | | {flops:.2e} | 100% | {hours} |")
    return "\n".join(lines)


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
