"""The toy text-to-image pipeline: an SD-1.5-shaped StableDiffusionPipeline small enough for a CPU.

Components, saved in diffusers format so every stage loads it with `from_pretrained(path)`:
- tokenizer: a real CLIP tokenizer with a truncated merge list (popalign.tiny_models);
- text encoder: a small CLIPTextModel with frozen random weights. It is never trained; the
  U-Net learns to read its (distinct) outputs for the toy prompts;
- VAE: a small AutoencoderKL (32x32x3 pictures <-> 16x16x4 latents) trained here briefly on toy
  pictures, its scaling factor set so that latents have unit standard deviation;
- U-Net: a ~1.1M-parameter UNet2DConditionModel with cross-attention at 8x8 and 4x4, random;
  the base model is this U-Net trained with train_popalign.py --loss sft on the biased data set;
- scheduler: DDIM with DDPM's linear betas and v-prediction, 20 steps at generation time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from popalign.tiny_models import build_tiny_clip_tokenizer
from popalign.training.data import image_to_tensor
from popalign.toy.world import IMAGE_SIZE, SPLIT_ROW, ToyWorld, render_figure

TEXT_HIDDEN = 64
TOKENIZER_MERGES = 4000  # enough merges that every toy word is one or two tokens


def _text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=77, projection_dim=TEXT_HIDDEN, vocab_size=vocab_size,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    text_encoder = CLIPTextModel(config)
    # Token embeddings 5x CLIP's initial scale: the frozen encoder's outputs for prompts that differ
    # in one word then differ more (about 1.5x), which the U-Net picks up sooner.
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.normal_(0.0, 0.1)
    return text_encoder


def toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)


def toy_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, cross_attention_dim=TEXT_HIDDEN, norm_num_groups=8,
    )


def toy_scheduler():
    from diffusers import DDIMScheduler

    # DDPM's linear betas (made for 32x32 pictures) spend more of the schedule at high noise, where the
    # picture's content (occupation, identity) is decided; v-prediction keeps the loss there from
    # vanishing as an epsilon loss does, so the U-Net learns to follow the prompt much sooner.
    return DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


def random_pictures(world: ToyWorld, count: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, 3, 32, 32) pictures in [-1, 1] of uniformly drawn occupations and identities."""
    pictures = []
    for _ in range(count):
        occupation = world.occupations[rng.integers(len(world.occupations))]
        gender = world.genders[rng.integers(len(world.genders))]
        race = world.races[rng.integers(len(world.races))]
        pictures.append(image_to_tensor(render_figure(world, occupation, gender, race, rng)))
    return torch.stack(pictures)


# What the VAE's figure weights compare a pixel with: the median of the whole border, or of its own half's border.
VAE_BACKGROUNDS = ("border", "halves")


def figure_weights(pictures: torch.Tensor, figure_weight: float = 5.0, split_row: Optional[int] = None) -> torch.Tensor:
    """(B, H, W) loss weights: `figure_weight` on pixels that differ from the picture's background, else 1.

    The figure is a small part of each picture; weighting it makes the VAE learn its colours (the
    identity cues) early instead of spending its first steps on the background. A pixel is figure when
        ||x[:, i, j] - b(i)|| > 0.2,
    with b the per-channel median of the picture's four edges (corners counted twice); with `split_row` (a two-tone background) b(i) is
    the median of the border pixels of the pixel's own half (rows < split_row, or the rest), so that the other
    half's colour does not count as figure.
    """
    if split_row is None:
        border = torch.cat([pictures[:, :, 0], pictures[:, :, -1], pictures[:, :, :, 0], pictures[:, :, :, -1]], dim=2)
        background = border.median(dim=2).values[:, :, None, None]
    else:
        top, bottom = pictures[:, :, :split_row], pictures[:, :, split_row:]
        backgrounds = []
        for half, edge_row in ((top, top[:, :, 0]), (bottom, bottom[:, :, -1])):
            border = torch.cat([edge_row, half[:, :, :, 0], half[:, :, :, -1]], dim=2)
            backgrounds.append(border.median(dim=2).values[:, :, None, None].expand_as(half))
        background = torch.cat(backgrounds, dim=2)
    figure = (pictures - background).norm(dim=1) > 0.2
    return 1.0 + (figure_weight - 1.0) * figure.float()


def train_toy_vae(world: ToyWorld, steps: int, batch_size: int = 32, learning_rate: float = 3e-3,
                  kl_weight: float = 1e-6, seed: int = 0, background: str = "halves"):
    """Train the toy AutoencoderKL to reconstruct toy pictures from posterior samples.

    loss = mean(w * (decode(z) - x)^2) + kl_weight * KL(q(z|x) || N(0, I)), z ~ q(z|x),
    with w the per-pixel weights of `figure_weights`: in a two-tone world against each half's own border median
    (background "halves", as models/toy_base_36_v2) or the whole border's (background "border", as models/toy_base_36,
    where that median is neither colour); in a world of one-colour backgrounds both are the same.
    Decoding from samples (not the mean) teaches a small posterior variance, so the latents the
    trainer samples decode to the same picture. Returns the VAE with `scaling_factor` set to
    1 / std of the posterior means over a fresh batch of pictures.
    """
    if background not in VAE_BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(VAE_BACKGROUNDS)} (got {background!r})")
    split_row = SPLIT_ROW if background == "halves" and world.two_tone else None
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = toy_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    progress = tqdm(range(steps), desc="toy VAE")
    for _ in progress:
        pictures = random_pictures(world, batch_size, rng)
        posterior = vae.encode(pictures).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        squared_error = (reconstruction - pictures).pow(2).mean(dim=1)
        loss = (squared_error * figure_weights(pictures, split_row=split_row)).mean() + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        means = vae.encode(random_pictures(world, 256, rng)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


def build_toy_pipeline(path: str | Path, world: ToyWorld, vae_steps: int = 600, seed: int = 0, vae_background: str = "halves") -> Path:
    """Save the untrained toy pipeline (trained VAE, random U-Net and text encoder) to `path`."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    tokenizer = build_tiny_clip_tokenizer(path / "tokenizer", TOKENIZER_MERGES)
    vae = train_toy_vae(world, vae_steps, seed=seed, background=vae_background)
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(len(tokenizer)), tokenizer=tokenizer, unet=toy_unet(),
        scheduler=toy_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path
