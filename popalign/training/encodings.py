"""Fill the encoding cache for a pairs file (sharded over processes) and assemble training batches from it."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from popalign.training.cache import (
    CachedEncodings,
    EncodingCache,
    caption_cache_key,
    fill_missing,
    image_cache_key,
    memoized_file_sha256,
    total_entry_bytes,
)
from popalign.training.data import (
    PairRecord,
    load_training_image,
    sample_randomness,
    stream_pair_indices,
)
from popalign.training.models import SDXL, encode_pixels, load_text_encoders, load_vae, module_fingerprint, sdxl_time_ids

LATENTS = "latents"
TEXT = "text"


@dataclass
class EncodedPairs:
    """Cache keys of every pair, and read access to the cached tensors. With --train_text_encoder the captions are not
    cached (the encoders being trained embed them at every step): caption_keys is None and the texts are kept."""

    winner_keys: list[str]
    loser_keys: Optional[list[str]]
    caption_keys: Optional[list[str]]
    empty_caption_key: Optional[str]  # set when caption dropout can replace a caption by ""
    encodings: CachedEncodings
    winner_prompt_keys: Optional[list[str]] = None  # each winner's own prompt, for prior preservation
    captions: Optional[list[str]] = None  # the texts, when they are embedded live
    winner_prompts: Optional[list[str]] = None

    def __len__(self) -> int:
        return len(self.winner_keys)


@dataclass
class TrainingBatch:
    """One process's micro-batch of B pairs, CPU tensors (float32 unless noted).

    winner_latents, loser_latents, noise: (B, C, h, w); timesteps: (B,) int64;
    prompt_embeds: (B, L, D); pooled_prompt_embeds: (B, P) (SDXL only);
    winner_time_ids, loser_time_ids: (B, 6) (SDXL only). loser_* are None for SFT.
    winner_prompt_embeds (B, L, D) and winner_pooled_prompt_embeds (B, P) (SDXL only): each winner's
    own prompt, never dropped; set only for prior preservation.
    With the text encoders trained, the embeddings are None and `captions` (after dropout) and `winner_prompts`
    hold the texts the trainer embeds (with_embedded_captions).
    """

    winner_latents: torch.Tensor
    loser_latents: Optional[torch.Tensor]
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: Optional[torch.Tensor]
    winner_time_ids: Optional[torch.Tensor]
    loser_time_ids: Optional[torch.Tensor]
    winner_prompt_embeds: Optional[torch.Tensor] = None
    winner_pooled_prompt_embeds: Optional[torch.Tensor] = None
    captions: Optional[list[str]] = None
    winner_prompts: Optional[list[str]] = None


def with_embedded_captions(batch: TrainingBatch, text, device) -> TrainingBatch:
    """The batch with its captions (and winner prompts) embedded by `text` (a TextEncoderStack, on `device`, with the
    gradient when its encoders train): what the cache holds for frozen encoders, computed live."""
    import dataclasses

    captions = text.embed(batch.captions, device)
    winner = text.embed(batch.winner_prompts, device) if batch.winner_prompts is not None else {}
    return dataclasses.replace(batch, prompt_embeds=captions["prompt_embeds"], pooled_prompt_embeds=captions.get("pooled_prompt_embeds"),
                               winner_prompt_embeds=winner.get("prompt_embeds"), winner_pooled_prompt_embeds=winner.get("pooled_prompt_embeds"))


def _hash_images(paths: Sequence[Path], memo_root: Path, process_index: int, num_processes: int) -> dict[Path, str]:
    """sha256 of every image file; each process hashes a share and the shares are exchanged."""
    from accelerate.utils import gather_object

    local = {str(path): memoized_file_sha256(path, memo_root) for path in paths[process_index::num_processes]}
    merged: dict[Path, str] = {}
    for share in gather_object([local]):
        merged.update({Path(path): digest for path, digest in share.items()})
    return merged


def build_encoded_pairs(
    records: Sequence[PairRecord],
    accelerator,
    cache_dir: Path,
    pretrained_model: str,
    vae_source: str,
    variant: str,
    kind: str,
    resolution: int,
    caption_dropout: float,
    vae_encode_batch_size: int,
    max_memory_cache_gb: float,
    cache_captions: bool = True,
) -> EncodedPairs:
    """Encode every image and caption the pairs need that the cache lacks; return the keyed view.

    Every process encodes a disjoint share; all wait for each other before reading. The VAE and
    text encoders loaded here are released afterwards. `cache_captions` False (the text encoders are trained, and the
    trainer runs its own copies every step): only the images are encoded, and the captions are kept as text.
    """
    cache = EncodingCache(cache_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    quiet = not accelerator.is_local_main_process

    uses_losers = records[0].loser_path is not None
    image_paths = sorted({record.winner_path for record in records} | ({record.loser_path for record in records} if uses_losers else set()))
    image_digests = _hash_images(image_paths, cache.root / "file_hashes", rank, world)

    vae = load_vae(pretrained_model, vae_source, variant, device)
    vae_fingerprint = module_fingerprint(vae_source or f"{pretrained_model}/vae", vae)
    image_keys = {path: image_cache_key(image_digests[path], vae_fingerprint, resolution) for path in image_paths}

    def encode_images(paths: list[Path]) -> list[dict[str, torch.Tensor]]:
        loaded = [load_training_image(path, resolution) for path in paths]
        latents = encode_pixels(vae, torch.stack([pixels for pixels, _ in loaded]))
        return [
            {
                "latents": latent,
                "original_size": torch.tensor(geometry.original_size, dtype=torch.int64),
                "crop_top_left": torch.tensor(geometry.crop_top_left, dtype=torch.int64),
            }
            for latent, (_, geometry) in zip(latents, loaded)
        ]

    progress = lambda desc: (lambda batches: tqdm(batches, desc=desc, disable=quiet))  # noqa: E731
    fill_missing(cache, LATENTS, {key: path for path, key in image_keys.items()}, encode_images, vae_encode_batch_size, rank, world, progress("encoding images"))
    vae = None  # released: training never encodes images again

    uses_winner_prompts = records[0].winner_prompt is not None
    if not cache_captions:
        accelerator.wait_for_everyone()
        keys_by_kind = {LATENTS: sorted(set(image_keys.values()))}
        in_memory = total_entry_bytes(cache, keys_by_kind) <= max_memory_cache_gb * 2**30
        return EncodedPairs(
            winner_keys=[image_keys[record.winner_path] for record in records],
            loser_keys=[image_keys[record.loser_path] for record in records] if uses_losers else None,
            caption_keys=None, empty_caption_key=None, encodings=CachedEncodings(cache, keys_by_kind, in_memory),
            captions=[record.caption for record in records],
            winner_prompts=[record.winner_prompt for record in records] if uses_winner_prompts else None)
    text = load_text_encoders(pretrained_model, kind, variant, device)
    captions = sorted({record.caption for record in records} | ({""} if caption_dropout > 0 else set())
                      | ({record.winner_prompt for record in records} if uses_winner_prompts else set()))
    caption_keys = {caption: caption_cache_key(caption, text.fingerprint) for caption in captions}

    def encode_captions(batch: list[str]) -> list[dict[str, torch.Tensor]]:
        encoded = text.encode(batch, device)
        return [{name: tensor[index] for name, tensor in encoded.items()} for index in range(len(batch))]

    fill_missing(cache, TEXT, {key: caption for caption, key in caption_keys.items()}, encode_captions, 64, rank, world, progress("encoding captions"))
    text = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    accelerator.wait_for_everyone()

    keys_by_kind = {LATENTS: sorted(set(image_keys.values())), TEXT: sorted(set(caption_keys.values()))}
    in_memory = total_entry_bytes(cache, keys_by_kind) <= max_memory_cache_gb * 2**30
    return EncodedPairs(
        winner_keys=[image_keys[record.winner_path] for record in records],
        loser_keys=[image_keys[record.loser_path] for record in records] if uses_losers else None,
        caption_keys=[caption_keys[record.caption] for record in records],
        empty_caption_key=caption_keys.get("") if caption_dropout > 0 else None,
        encodings=CachedEncodings(cache, keys_by_kind, in_memory),
        winner_prompt_keys=[caption_keys[record.winner_prompt] for record in records] if uses_winner_prompts else None,
    )


def assemble_batch(
    pairs: EncodedPairs,
    positions: range,
    seed: int,
    timestep_range: tuple[int, int],
    caption_dropout: float,
    kind: str,
    resolution: int,
    with_losers: bool,
    shared_timestep: Optional[int] = None,
    with_winner_prompts: bool = False,
) -> TrainingBatch:
    """The pairs at these stream positions, with each pair's own noise, timestep and caption dropout.

    Timesteps are drawn from U{low..high-1} of `timestep_range`; `shared_timestep` replaces every
    pair's own timestep (one noise level for the whole batch). `with_winner_prompts` adds the
    encodings of each winner's own prompt (caption dropout never touches them).
    """
    pair_indices = stream_pair_indices(len(pairs), seed, positions.start, len(positions))
    winners, losers, noises, timesteps, texts, winner_texts = [], [], [], [], [], []
    for position, pair_index in zip(positions, pair_indices):
        winner = pairs.encodings.get(LATENTS, pairs.winner_keys[pair_index])
        drawn = sample_randomness(seed, position, tuple(winner["latents"].shape), timestep_range, caption_dropout)
        winners.append(winner)
        if with_losers:
            losers.append(pairs.encodings.get(LATENTS, pairs.loser_keys[pair_index]))
        noises.append(drawn.noise)
        timesteps.append(drawn.timestep if shared_timestep is None else shared_timestep)
        if pairs.caption_keys is None:  # embedded live by the trained text encoders
            texts.append("" if drawn.drop_caption else pairs.captions[pair_index])
            if with_winner_prompts:
                winner_texts.append(pairs.winner_prompts[pair_index])
            continue
        caption_key = pairs.empty_caption_key if drawn.drop_caption else pairs.caption_keys[pair_index]
        texts.append(pairs.encodings.get(TEXT, caption_key))
        if with_winner_prompts:
            winner_texts.append(pairs.encodings.get(TEXT, pairs.winner_prompt_keys[pair_index]))

    def time_ids(entries):
        return sdxl_time_ids(torch.stack([entry["original_size"] for entry in entries]),
                             torch.stack([entry["crop_top_left"] for entry in entries]), resolution)

    is_sdxl = kind == SDXL
    cached = pairs.caption_keys is not None  # else `texts` holds the captions, embedded by the trainer

    def stacked(entries, name):
        return torch.stack([entry[name] for entry in entries]) if cached and entries else None

    return TrainingBatch(
        winner_latents=torch.stack([entry["latents"] for entry in winners]),
        loser_latents=torch.stack([entry["latents"] for entry in losers]) if with_losers else None,
        noise=torch.stack(noises),
        timesteps=torch.tensor(timesteps, dtype=torch.int64),
        prompt_embeds=stacked(texts, "prompt_embeds"),
        pooled_prompt_embeds=stacked(texts, "pooled_prompt_embeds") if is_sdxl else None,
        winner_time_ids=time_ids(winners) if is_sdxl else None,
        loser_time_ids=time_ids(losers) if is_sdxl and with_losers else None,
        winner_prompt_embeds=stacked(winner_texts, "prompt_embeds") if with_winner_prompts else None,
        winner_pooled_prompt_embeds=stacked(winner_texts, "pooled_prompt_embeds") if with_winner_prompts and is_sdxl else None,
        captions=None if cached else texts,
        winner_prompts=None if cached or not with_winner_prompts else winner_texts,
    )
