"""On-disk cache of VAE latents and text embeddings, keyed by content.

A training step then runs only U-Net work. Keys:

    image:   sha256(image file bytes) + VAE fingerprint + resolution + crop rule
    caption: sha256(caption text) + text-encoder fingerprints

so a renamed image reuses its entry, and a different VAE, resolution or encoder never does.
Entries are single safetensors files written atomically (temporary file, then rename), so
processes can fill the cache in parallel and a crash leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from popalign.io import atomic_write_json, file_sha256, write_faults_named

CROP_RULE = "resize-shorter-side+center-crop"


def memoized_file_sha256(path: Path, memo_root: Path) -> str:
    """file_sha256, remembered under `memo_root` per (absolute path, size, mtime).

    Hashing every training image on every run would re-read the whole data set; a file whose
    size and modification time are unchanged is taken to have unchanged content (as make and
    rsync do).
    """
    stat = path.stat()
    name = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()
    memo = memo_root / name[:2] / f"{name}.json"
    try:
        record = json.loads(memo.read_text(encoding="utf-8"))
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = file_sha256(path)
    atomic_write_json(memo, {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    return digest


def image_cache_key(image_sha256: str, vae_fingerprint: str, resolution: int) -> str:
    text = f"image|{image_sha256}|{vae_fingerprint}|{resolution}|{CROP_RULE}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def caption_cache_key(caption: str, text_fingerprint: str) -> str:
    text = f"caption|{text_fingerprint}|{caption}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EncodingCache:
    """A folder of `<kind>/<key[:2]>/<key>.safetensors` entries (kind: latents or text)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def write(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        target = self.path(kind, key)
        with write_faults_named(target):  # a full disk is one line naming the entry; the entries before stay
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{key}.", suffix=".tmp")
            os.close(handle)
            try:
                save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_name)
                os.replace(tmp_name, target)
            except BaseException:
                if os.path.exists(tmp_name):
                    os.unlink(tmp_name)
                raise

    def read(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(kind, key))

    def entry_bytes(self, kind: str, key: str) -> int:
        return self.path(kind, key).stat().st_size


def fill_missing(
    cache: EncodingCache,
    kind: str,
    items: dict[str, object],
    encode_batch: Callable[[list[object]], list[dict[str, torch.Tensor]]],
    batch_size: int,
    process_index: int,
    num_processes: int,
    progress: Callable[[Iterable], Iterable] = lambda batches: batches,
) -> int:
    """Encode the entries of this process's share that are not cached yet; return how many it wrote.

    `items` maps key -> what `encode_batch` needs to encode it. ALL keys are sorted and dealt
    round-robin over processes, and only then are cached ones skipped: the shares do not depend on
    what other processes have already written when this one looks, so together they always cover
    every key. The caller waits for all processes before reading.
    """
    share = [key for key in sorted(items)[process_index::num_processes] if not cache.has(kind, key)]
    batches = [share[start : start + batch_size] for start in range(0, len(share), batch_size)]
    for batch_keys in progress(batches):
        for key, tensors in zip(batch_keys, encode_batch([items[key] for key in batch_keys])):
            cache.write(kind, key, tensors)
    return len(share)


class CachedEncodings:
    """Read access to the entries a run needs: all held in memory, or read from disk on each use."""

    def __init__(self, cache: EncodingCache, keys_by_kind: dict[str, Sequence[str]], in_memory: bool):
        self.cache = cache
        self.in_memory = in_memory
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for kind, keys in keys_by_kind.items():
            for key in keys:
                if not cache.has(kind, key):
                    raise FileNotFoundError(f"encoding cache entry missing after filling: {cache.path(kind, key)}")
                if in_memory:
                    self._memory[(kind, key)] = cache.read(kind, key)

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        if self.in_memory:
            return self._memory[(kind, key)]
        return self.cache.read(kind, key)


def total_entry_bytes(cache: EncodingCache, keys_by_kind: dict[str, Sequence[str]]) -> int:
    return sum(cache.entry_bytes(kind, key) for kind, keys in keys_by_kind.items() for key in keys)
