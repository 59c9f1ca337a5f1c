"""Training data: the pairs file, image geometry, and the deterministic stream of samples.

The order of pairs, each pair's noise, timestep and caption dropout are pure functions of
(seed, position in the sample stream). A process only decides WHICH positions it handles, so a
run gives the same samples whatever the number of processes, and a resumed run continues the
stream exactly where the checkpoint left it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from popalign.io import InputError, csv_row_number, read_csv_checked


@dataclass(frozen=True)
class PairRecord:
    """One row of the pairs file; loser_path is None for objectives that never read losers."""

    winner_path: Path
    loser_path: Optional[Path]
    caption: str
    winner_prompt: Optional[str] = None  # the winner's own (identity-specific) prompt, read for prior preservation


def _resolve(path_text: str, base: Path) -> Path:
    path = Path(path_text)
    return path if path.is_absolute() else base / path


def read_pairs(pairs_file: str | Path, needs_losers: bool, needs_winner_prompts: bool = False) -> list[PairRecord]:
    """Read winner_path, loser_path, caption rows; check that every named image exists.

    Paths are relative to the pairs file's folder unless absolute. Extra columns (the population
    statistics) are ignored. When `needs_losers` is False the loser_path column may be missing or
    empty; when `needs_winner_prompts` is True every row needs a winner_prompt.
    """
    pairs_file = Path(pairs_file)
    required = (["winner_path", "caption"] + (["loser_path"] if needs_losers else [])
                + (["winner_prompt"] if needs_winner_prompts else []))
    frame = read_csv_checked(pairs_file, required)
    base = pairs_file.resolve().parent
    records = []
    for index, row in enumerate(frame.to_dict("records")):
        where = f"{pairs_file}: row {csv_row_number(index)}"
        if not row["winner_path"]:
            raise InputError(f"{where}: empty winner_path")
        winner = _resolve(row["winner_path"], base)
        loser = None
        if needs_losers:
            if not row["loser_path"]:
                raise InputError(f"{where}: empty loser_path (needed by this loss)")
            loser = _resolve(row["loser_path"], base)
        for image_path in (winner, loser):
            if image_path is not None and not image_path.is_file():
                raise InputError(f"{where}: image not found: {image_path}")
        winner_prompt = None
        if needs_winner_prompts:
            if not row["winner_prompt"]:
                raise InputError(f"{where}: empty winner_prompt (needed by --prior_preservation_weight)")
            winner_prompt = row["winner_prompt"]
        records.append(PairRecord(winner_path=winner, loser_path=loser, caption=row["caption"], winner_prompt=winner_prompt))
    if not records:
        raise InputError(f"{pairs_file}: no pairs")
    return records


@dataclass(frozen=True)
class CropGeometry:
    """Where a training image came from, as SDXL's micro-conditioning wants it (pixels).

    original_size: (height, width) of the file; crop_top_left: (top, left) of the crop in the
    resized image.
    """

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def resize_and_center_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, CropGeometry]:
    """Scale so the shorter side equals `resolution`, then cut the centred square of that size."""
    width, height = image.size
    scale = resolution / min(width, height)
    resized_width = max(resolution, round(width * scale))
    resized_height = max(resolution, round(height * scale))
    if (resized_width, resized_height) != (width, height):
        image = image.resize((resized_width, resized_height), resample=Image.Resampling.LANCZOS)
    top = (resized_height - resolution) // 2
    left = (resized_width - resolution) // 2
    cropped = image.crop((left, top, left + resolution, top + resolution))
    return cropped, CropGeometry(original_size=(height, width), crop_top_left=(top, left))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_training_image(path: Path, resolution: int) -> tuple[torch.Tensor, CropGeometry]:
    """Read an image file into a (3, resolution, resolution) tensor and its crop geometry."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable image ({error})") from None
    cropped, geometry = resize_and_center_crop(image, resolution)
    return image_to_tensor(cropped), geometry


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of values; independent streams for different purposes."""
    text = "|".join(str(part) for part in parts)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16)


@lru_cache(maxsize=4)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return tuple(torch.randperm(num_pairs, generator=generator).tolist())


def stream_pair_indices(num_pairs: int, seed: int, start: int, count: int) -> list[int]:
    """Pair indices at positions [start, start + count) of the sample stream.

    The stream is the concatenation of one random permutation of all pairs per epoch, so every
    pair is seen once per epoch; position k belongs to epoch k // num_pairs.
    """
    return [_epoch_order(num_pairs, seed, position // num_pairs)[position % num_pairs] for position in range(start, start + count)]


def process_stream_positions(micro_step: int, process_index: int, num_processes: int, pairs_per_process: int) -> range:
    """Stream positions a process handles at a micro-step (counted from the start of training).

    The global micro-batch is pairs_per_process * num_processes consecutive positions; process p
    takes the p-th slice. So 2 processes x 1 pair see exactly the samples 1 process x 2 pairs sees.
    """
    start = (micro_step * num_processes + process_index) * pairs_per_process
    return range(start, start + pairs_per_process)


@dataclass
class SampleRandomness:
    """What is drawn for one pair: shared by its winner and loser."""

    noise: torch.Tensor  # (C, h, w) float32
    timestep: int  # in the timestep range [low, high)
    drop_caption: bool


def timestep_bounds(num_train_timesteps: int, min_timestep: int = 0, max_timestep: int = -1) -> tuple[int, int]:
    """(low, high) with t drawn from U{low..high-1}: [min_timestep, max_timestep], max_timestep -1 meaning T-1."""
    high = num_train_timesteps if max_timestep < 0 else max_timestep + 1
    if not 0 <= min_timestep < high <= num_train_timesteps:
        raise InputError(f"--min_timestep {min_timestep} / --max_timestep {max_timestep}: need 0 <= min <= max <= "
                         f"{num_train_timesteps - 1} (the scheduler's last timestep)")
    return min_timestep, high


def sample_randomness(seed: int, position: int, latent_shape: tuple[int, ...], timestep_range: tuple[int, int],
                      caption_dropout: float) -> SampleRandomness:
    """Noise ~ N(0, I), t ~ U{low..high-1} of `timestep_range` (see timestep_bounds) and the caption-dropout coin of one stream position."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "sample", position))
    noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
    timestep = int(torch.randint(*timestep_range, (), generator=generator))
    drop_caption = bool(torch.rand((), generator=generator) < caption_dropout)
    return SampleRandomness(noise=noise, timestep=timestep, drop_caption=drop_caption)
