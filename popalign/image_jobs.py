"""Resumable work over every image of a step-2 folder, sharded over processes.

Classification and quality scoring share this: each process appends one JSON line per finished
image to its own part file `<out_dir>/.<stem>.part<rank>.jsonl` (flushed per batch), the options
the work was started with are kept in `.<stem>.settings.json`, and a re-run with any process
count skips every image some part file already holds. The caller turns the rows into its CSV.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from popalign.io import (InputError, atomic_write_json, open_for_append, read_jsonl, refuse_symlink, remove_orphaned_temporary_files,
                         write_faults_named)


class SingleProcess:
    """The process view of a run without accelerate: one process, nothing to wait for."""

    process_index = 0
    num_processes = 1
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def load_rgb(path: Path) -> Image.Image:
    """The image as RGB; InputError naming the file when it does not decode (truncated, not an image)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: not a readable image ({error}); delete it and re-run generation, which makes it again") from None


class ImageJob:
    """The files of one resumable per-image job (`stem` e.g. 'labels_deepface', 'quality_hpsv2')."""

    def __init__(self, out_dir: str | Path, stem: str):
        self.out_dir = Path(out_dir)
        self.stem = stem

    @property
    def settings_path(self) -> Path:
        return self.out_dir / f".{self.stem}.settings.json"

    def part_path(self, rank: int) -> Path:
        return self.out_dir / f".{self.stem}.part{rank}.jsonl"

    def finished_rows(self) -> dict[str, dict]:
        """Rows written by any process of any earlier or current run, by image path."""
        return {record["image_path"]: record for record in read_jsonl(sorted(self.out_dir.glob(f".{self.stem}.part*.jsonl")))}

    def saved_settings(self) -> dict | None:
        return json.loads(self.settings_path.read_text(encoding="utf-8")) if self.settings_path.is_file() else None

    def complete_output(self, final_path: Path, options: dict, image_paths: Sequence[str]) -> pd.DataFrame | None:
        """The job's final CSV when it lists exactly `image_paths`, in order, and the job was made with `options`
        (the settings' "options"); else None. A finished job is not run again, and its model is not even loaded."""
        saved = self.saved_settings()
        if saved is None or not final_path.is_file() or saved.get("options") != options:
            return None
        written = pd.read_csv(final_path, dtype=str, keep_default_na=False)
        return written if list(written["image_path"]) == list(image_paths) else None

    def check_settings(self, settings: dict, describe_mismatch: Callable[[dict], str], ignored: tuple[str, ...] = ()) -> None:
        """Refuse to mix rows made with other settings (the keys in `ignored` are recorded, not compared);
        `describe_mismatch(saved)` words the error."""
        self.refuse_links()
        saved = self.saved_settings()
        if saved is not None and {key: value for key, value in saved.items() if key not in ignored} \
                != {key: value for key, value in settings.items() if key not in ignored}:
            raise InputError(f"{self.settings_path}: {describe_mismatch(saved)}")

    def refuse_links(self) -> None:
        """The job's own files (settings, every part file) must be files of this folder, not links to elsewhere: they
        are read back and appended to. InputError naming the first link."""
        for path in [self.settings_path, *sorted(self.out_dir.glob(f".{self.stem}.part*.jsonl"))]:
            refuse_symlink(path)

    def open_part_for_append(self, rank: int):
        """Append mode (never through a link: O_NOFOLLOW), first ending a line a killed run may have left half-written."""
        stream = open_for_append(self.part_path(rank))
        if stream.tell() > 0:
            stream.seek(stream.tell() - 1)
            if stream.read(1) != "\n":
                stream.write("\n")
        return stream


def run_image_job(job: ImageJob, image_paths: Sequence[str], settings: dict, process_batch: Callable[[list[str]], list[dict]],
                  batch_size: int, process, progress_label: str) -> dict[str, dict]:
    """Run `process_batch` on every image of `image_paths` that no part file holds yet; return all rows.

    `settings` must already be checked against the saved ones (ImageJob.check_settings).
    `process_batch(paths)` returns one JSON-serialisable row per path, in order. `process` is an
    Accelerator (process_index, num_processes, is_main_process, wait_for_everyone) or
    SingleProcess(); every process must call this.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    job.refuse_links()
    if process.is_main_process:
        remove_orphaned_temporary_files(job.out_dir)  # a killed run's half-written files; no process writes yet
    finished = job.finished_rows()
    # Every process must see the same finished set before any of them appends to its part file,
    # or they would shard different pending lists and skip or repeat images.
    process.wait_for_everyone()
    if process.is_main_process:
        atomic_write_json(job.settings_path, settings)
    pending = [image_path for image_path in image_paths if image_path not in finished]
    assigned = pending[process.process_index :: process.num_processes]
    # Closed also when a batch fails, so that the bar's line ends before the error is printed.
    part_path = job.part_path(process.process_index)
    with tqdm(total=len(assigned), desc=progress_label, unit="image", disable=not process.is_main_process) as progress:
        for start in range(0, len(assigned), batch_size):
            batch_paths = assigned[start : start + batch_size]
            rows = process_batch(batch_paths)
            if len(rows) != len(batch_paths):
                raise RuntimeError(f"{progress_label}: {len(rows)} results for {len(batch_paths)} images")
            # Opened per batch, so that a failed write (a full disk) is named here and no buffered line is left
            # to fail again when the file is closed.
            with write_faults_named(part_path), job.open_part_for_append(process.process_index) as part:
                part.write("".join(json.dumps({"image_path": image_path, **row}) + "\n" for image_path, row in zip(batch_paths, rows)))
                part.flush()
                os.fsync(part.fileno())
            progress.update(len(batch_paths))
    process.wait_for_everyone()
    rows = job.finished_rows()
    missing = [image_path for image_path in image_paths if image_path not in rows]
    if missing:
        raise RuntimeError(f"{progress_label}: {len(missing)} image(s) have no row after the run, e.g. {missing[0]}")
    return rows
