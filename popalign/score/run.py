"""Score every image of a generated folder with quality scorers, sharded over processes and resumable.

Reads `<out_dir>/manifest.csv` (image_path, prompt) and writes one `<out_dir>/quality_<scorer>.csv`
per scorer with the columns QUALITY_COLUMNS: image_path, prompt, score, scorer (the registry
name) and scorer_description (model, checkpoint and formula). While it runs, each process
appends its finished rows to `<out_dir>/.quality_<scorer>.part<rank>.jsonl`, flushed per batch;
a re-run, with any number of processes, skips every image found in any part file. The final CSV
is written by the main process, atomically, in manifest order, once every image has a score.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from popalign.image_folder import QUALITY_COLUMNS, quality_path, read_manifest
from popalign.image_jobs import ImageJob, SingleProcess, load_rgb, run_image_job
from popalign.io import atomic_write_csv
from popalign.locks import output_lock
from popalign.score import build_scorer
from popalign.score.base import QualityScorer



def read_manifest_prompts(out_dir: str | Path) -> list[tuple[str, str]]:
    """(image_path, prompt) of every manifest row, in order; every image must exist and appear once."""
    manifest = read_manifest(out_dir, ["image_path", "prompt"])
    return list(zip(manifest["image_path"], manifest["prompt"]))


def _jsonable(options: dict) -> dict:
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def _already_complete(out_dir: Path, scorer_name: str, options: dict, image_paths: list[str]) -> bool:
    """True when quality_<name>.csv covers exactly the manifest's images, made with these options."""
    return ImageJob(out_dir, f"quality_{scorer_name}").complete_output(quality_path(out_dir, scorer_name), options, image_paths) is not None


def score_folder_with(out_dir: str | Path, scorer: QualityScorer, options: dict | None = None, accelerator=None) -> Path:
    """Score the images of `out_dir` not scored yet with `scorer`, then write quality_<name>.csv.

    `options` are the options the scorer was built with (recorded, so that a resumed run cannot
    mix scores of different models). `accelerator` is an `accelerate.Accelerator` / `PartialState`
    (process_index, num_processes, is_main_process, wait_for_everyone); None runs in this process
    alone. Every process must call this. Returns the path of the CSV.
    """
    process = accelerator if accelerator is not None else SingleProcess()
    out_dir = Path(out_dir)
    pairs = read_manifest_prompts(out_dir)
    with output_lock(out_dir, f"quality_{scorer.name}", take=process.is_main_process):  # one run per scores file
        settings = {"scorer": scorer.name, "description": scorer.description, "options": _jsonable(options or {})}
        job = ImageJob(out_dir, f"quality_{scorer.name}")
        job.check_settings(settings, lambda saved: (
            f"{scorer.name} scores in {out_dir} were started with {saved}, not {settings}; "
            f"use the same settings or delete {out_dir}/.quality_{scorer.name}.* and quality_{scorer.name}.csv"))
        prompts = dict(pairs)

        def score_batch(batch_paths: list[str]) -> list[dict]:
            batch_prompts = [prompts[image_path] for image_path in batch_paths]
            scores = scorer.score([load_rgb(out_dir / image_path) for image_path in batch_paths], batch_prompts)
            return [{"prompt": prompt, "score": score} for prompt, score in zip(batch_prompts, scores)]

        rows = run_image_job(job, [image_path for image_path, _ in pairs], settings, score_batch, scorer.batch_size, process,
                             f"quality ({scorer.name})")
        final_path = quality_path(out_dir, scorer.name)
        if process.is_main_process:
            frame = pd.DataFrame.from_records(
                [(image_path, prompt, rows[image_path]["score"], scorer.name, scorer.description) for image_path, prompt in pairs],
                columns=QUALITY_COLUMNS,
            )
            atomic_write_csv(final_path, frame)
            tqdm.write(f"{len(frame)} images, mean {scorer.name} {frame['score'].mean():.4f} -> {final_path}")
    # No process returns before the file exists.
    process.wait_for_everyone()
    return final_path


def score_image_folder(out_dir: str | Path, scorer_names: list[str], batch_size: int = 8,
                       scorer_options: dict[str, dict] | None = None, device: str | None = None, dtype: str = "auto",
                       accelerator=None) -> dict[str, Path]:
    """Write quality_<name>.csv in `out_dir` for every scorer of `scorer_names`, one model at a time.

    `scorer_options[name]` are extra build_scorer options for that scorer (checkpoint paths,
    model ids); `device` defaults to the accelerator's GPU, else each scorer's default (the CPU
    without a GPU); dtype "auto" leaves each scorer's default. A scorer whose CSV already covers
    the manifest with the same options is skipped without loading its model. Returns
    {scorer name: CSV path}.
    """
    scorer_options = scorer_options or {}
    unknown = sorted(set(scorer_options) - set(scorer_names))
    if unknown:
        raise ValueError(f"options given for scorer(s) not run: {', '.join(unknown)}")
    out_dir = Path(out_dir)
    image_paths = [image_path for image_path, _ in read_manifest_prompts(out_dir)]
    if device is None and accelerator is not None and accelerator.device.type != "cpu":
        device = str(accelerator.device)  # this process's own GPU
    # device / dtype are passed only when set, so scorers without those options (toy) also run.
    placement = {"device": device} if device is not None else {}
    if dtype != "auto":
        placement["dtype"] = dtype
    process = accelerator if accelerator is not None else SingleProcess()
    written = {}
    for name in scorer_names:
        options = {"batch_size": batch_size, **placement, **scorer_options.get(name, {})}
        recorded = _jsonable({key: value for key, value in options.items() if key not in ("device", "batch_size")})
        if _already_complete(out_dir, name, recorded, image_paths):
            if process.is_main_process:
                tqdm.write(f"{quality_path(out_dir, name)} is complete, skipping {name}")
            written[name] = quality_path(out_dir, name)
            continue
        scorer = build_scorer(name, **options)
        written[name] = score_folder_with(out_dir, scorer, recorded, accelerator)
        del scorer  # free the model before loading the next one
    return written
