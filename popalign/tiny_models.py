"""Tiny random-weight pipelines of the real architectures, built offline from configs.

Tests and the toy world load these with the same `from_pretrained(path)` call used for
`stabilityai/stable-diffusion-xl-base-1.0`, so every real code path runs without a model hub.
The tokenizer is a real CLIP tokenizer: its byte-pair merges come from the BPE file that
open_clip ships (the one CLIP was trained with); `num_merges` truncates the vocabulary.

    python -m popalign.tiny_models --kind sdxl --out /tmp/tiny-sdxl
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch

CLIP_FULL_MERGES = 49152 - 256 - 2  # merges in CLIP's 49,408-token vocabulary
TINY_TEXT_HIDDEN = 32
TINY_MAX_TOKENS = 77


def _byte_to_unicode_table() -> dict[int, str]:
    """CLIP/GPT-2 byte-level BPE alphabet: each byte maps to a printable character.

    Printable Latin-1 bytes map to themselves; the remaining bytes are shifted past 255, in
    byte order. The order of the values defines the first 256 token ids.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return table


def open_clip_bpe_path() -> Path:
    import open_clip  # ships CLIP's merges file

    return Path(open_clip.__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"


def build_tiny_clip_tokenizer(path: str | Path, num_merges: int = 1000):
    """Write a CLIPTokenizer (vocab.json + merges.txt) built from CLIP's own merges; return it loaded.

    With num_merges = 49152-256-2 the ids equal CLIP's; fewer merges give a smaller vocabulary
    (size 512 + num_merges + 2) that tokenizes the same text into smaller pieces.
    """
    from transformers import CLIPTokenizer

    if not 0 <= num_merges <= CLIP_FULL_MERGES:
        raise ValueError(f"num_merges must be in [0, {CLIP_FULL_MERGES}], got {num_merges}")
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]  # line 0 is a version header
    alphabet = list(_byte_to_unicode_table().values())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=TINY_MAX_TOKENS, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    return tokenizer


def _tiny_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=TINY_TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=TINY_MAX_TOKENS, projection_dim=TINY_TEXT_HIDDEN, vocab_size=vocab_size,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         layers_per_block=1, sample_size=64)


def _tiny_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="leading", prediction_type="epsilon")


def build_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, num_merges: int = 1000):
    """Save a random-weight StableDiffusionXLPipeline (two text encoders, text_time conditioning) to `path`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    tokenizer = build_tiny_clip_tokenizer(path / "tokenizer", num_merges)
    tokenizer_2 = build_tiny_clip_tokenizer(path / "tokenizer_2", num_merges)
    torch.manual_seed(seed)
    text_config = _tiny_text_config(len(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_HIDDEN,
        cross_attention_dim=2 * TINY_TEXT_HIDDEN, norm_num_groups=32,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_tiny_scheduler(),
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_sd_pipeline(path: str | Path, seed: int = 0, num_merges: int = 1000):
    """Save a random-weight SD-1.5-shaped StableDiffusionPipeline (one text encoder) to `path`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    tokenizer = build_tiny_clip_tokenizer(path / "tokenizer", num_merges)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=TINY_TEXT_HIDDEN, norm_num_groups=32,
    )
    pipeline = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_tiny_text_config(len(tokenizer))), tokenizer=tokenizer, unet=unet,
        scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_clip_model(path: str | Path, seed: int = 0) -> Path:
    """A random-weight transformers CLIPModel + CLIPProcessor (CLIP's BPE, 32x32 images) saved to `path`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tokenizer = build_tiny_clip_tokenizer(path, num_merges=1000)
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def build_random_sd15_pipeline(path: str | Path, seed: int = 0):
    """Save a StableDiffusionPipeline of the real SD 1.5 architecture (U-Net, VAE and CLIP ViT-L/14 text encoder
    configurations as published, CLIP's full vocabulary) with random weights to `path`: what the benchmarks time,
    where the compute is that of the real model. About 4 GB in float32."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from popalign.architectures import SD15_UNET, VAE

    path = Path(path)
    tokenizer = build_tiny_clip_tokenizer(path / "tokenizer", CLIP_FULL_MERGES)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, projection_dim=768, vocab_size=len(tokenizer), hidden_act="quick_gelu",
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE, sample_size=512), text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def build_random_clip_vit_l14(path: str | Path, seed: int = 0) -> Path:
    """A transformers CLIPModel + CLIPProcessor of openai/clip-vit-large-patch14's architecture (224x224 images,
    CLIP's full vocabulary) with random weights, saved to `path`: the CLIP score and the zero-shot classifier at
    their real cost, for the benchmarks."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    tokenizer = build_tiny_clip_tokenizer(path, CLIP_FULL_MERGES)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=1, hidden_act="quick_gelu")
    vision_config = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=768)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


BUILDERS = {"sdxl": build_tiny_sdxl_pipeline, "sd": build_tiny_sd_pipeline, "sd15_random": build_random_sd15_pipeline,
            "clip_vit_l14_random": build_random_clip_vit_l14}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight diffusers pipeline offline.")
    parser.add_argument("--kind", choices=sorted(BUILDERS), default="sdxl")
    parser.add_argument("--out", required=True, help="folder to save the pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(BUILDERS[args.kind](args.out, seed=args.seed))


if __name__ == "__main__":
    main()
