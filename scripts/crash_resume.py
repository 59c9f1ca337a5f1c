"""Crash and resume, measured: SIGKILL generation, classification, scoring and training at random moments, resume,
and compare with an uninterrupted run.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/crash_resume.py --output_dir outputs/crash_resume --kills 20

The run is the toy base's small run (popalign.toy.small_run) with more images and a training run that checkpoints
every step. Each stage first runs uninterrupted (the reference). Then, `--kills` times per stage, a fresh copy of the
stage's inputs is made, the stage is started and killed with SIGKILL (its whole process group) at a random moment:

- most kills at a random point of the stage's progress, drawn uniformly between its first and its last unit of work
  (images written, labels or scores appended, training steps logged), watched every millisecond;
- every fourth kill as soon as a write is seen in progress (a temporary image or file, a `checkpoint-N.partial`
  folder), so that some land inside image and checkpoint writes; how many did is counted from what they left.

The stage is then run again, to its end, with the same command, and compared with the reference: images within one
8-bit level and the same manifest; labels and scores files byte-identical; trained weights equal (on CPU) and
metrics.jsonl one line per step, equal to the reference's. Writes <output_dir>/crash_resume.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from popalign.toy.small_run import TOY_ENVIRONMENT, stage_arguments, stage_command, write_inputs

STAGES = ("generate", "classify", "score", "train")
SHARED_CACHE = "preferences/encoding_cache"
# What each stage reads, copied from the reference run into a trial's folder before it starts.
INPUTS = {"generate": ["occupations.csv", "attributes.json", "prompts"],
          "classify": ["occupations.csv", "attributes.json", "prompts", "images"],
          "score": ["occupations.csv", "attributes.json", "prompts", "images"],
          "train": ["occupations.csv", "attributes.json", "prompts", "images", "preferences"]}
# The outputs a trial's copy must not start with: what the stage itself writes.
STAGE_OUTPUTS = {"classify": ["images/train/labels_toy.csv", "images/train/.labels_toy.settings.json", "images/train/.labels_toy.part0.jsonl"],
                 "score": ["images/train/quality_toy.csv", "images/train/.quality_toy.settings.json", "images/train/.quality_toy.part0.jsonl"],
                 "train": ["preferences/encoding_cache"]}


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def progress_of(stage: str, folder: Path) -> int:
    """Units of work the stage has finished in `folder`."""
    if stage == "generate":
        return sum(1 for _ in (folder / "images/train/images").glob("*/*.png"))
    if stage == "classify":
        return count_lines(folder / "images/train/.labels_toy.part0.jsonl")
    if stage == "score":
        return count_lines(folder / "images/train/.quality_toy.part0.jsonl")
    return count_lines(folder / "train/popalign/metrics.jsonl")


def writes_in_progress(folder: Path) -> list[str]:
    """Temporary files and partial checkpoints present now: a write under way (or one a kill cut short)."""
    found = [str(path.relative_to(folder)) for path in folder.rglob("*.tmp")]
    found += [str(path.relative_to(folder)) for path in (folder / "train/popalign").glob("checkpoint-*.partial")]
    return found


def environment() -> dict:
    return {**os.environ, **TOY_ENVIRONMENT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(command: list[str], folder: Path) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=folder, env=environment(), capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {folder} failed:\n{completed.stderr[-3000:]}")
    return time.perf_counter() - started


def kill_during(stage: str, command: list[str], folder: Path, target_progress: int | None, timeout: float) -> dict:
    """Start the stage and SIGKILL it once `target_progress` units are done, or (None) once a write is seen in progress."""
    process = subprocess.Popen(command, cwd=folder, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    started, killed = time.perf_counter(), False
    while process.poll() is None and time.perf_counter() - started < timeout:
        if (writes_in_progress(folder) if target_progress is None else progress_of(stage, folder) >= target_progress):
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    if process.poll() is None and not killed:  # the moment never came: kill at the timeout
        os.killpg(process.pid, signal.SIGKILL)
        killed = True
    process.wait()
    return {"killed": killed, "seconds": round(time.perf_counter() - started, 3), "progress_at_kill": progress_of(stage, folder),
            "left_partial": writes_in_progress(folder)}


def compare(stage: str, trial: Path, reference: Path) -> dict:
    """How the resumed stage's outputs differ from the reference's."""
    if stage == "generate":
        manifest = pd.read_csv(trial / "images/train/manifest.csv", dtype=str, keep_default_na=False)
        reference_manifest = pd.read_csv(reference / "images/train/manifest.csv", dtype=str, keep_default_na=False)
        worst = 0
        for image_path in reference_manifest["image_path"]:
            first = np.asarray(Image.open(trial / "images/train" / image_path).convert("RGB"), dtype=np.int16)
            second = np.asarray(Image.open(reference / "images/train" / image_path).convert("RGB"), dtype=np.int16)
            worst = max(worst, int(np.abs(first - second).max()))
        return {"same_manifest": manifest.equals(reference_manifest), "max_pixel_difference": worst,
                "ok": manifest.equals(reference_manifest) and worst <= 1}
    if stage in ("classify", "score"):
        name = "labels_toy.csv" if stage == "classify" else "quality_toy.csv"
        same = (trial / "images/train" / name).read_bytes() == (reference / "images/train" / name).read_bytes()
        return {"same_file": same, "ok": same}
    from safetensors.torch import load_file

    weights = "train/popalign/unet/diffusion_pytorch_model.safetensors"
    first, second = load_file(str(trial / weights)), load_file(str(reference / weights))
    difference = max(float((first[name] - second[name]).abs().max()) for name in second)
    lines = [json.loads(line) for line in (trial / "train/popalign/metrics.jsonl").read_text().splitlines()]
    reference_lines = [json.loads(line) for line in (reference / "train/popalign/metrics.jsonl").read_text().splitlines()]
    one_line_per_step = [line["step"] for line in lines] == list(range(1, len(reference_lines) + 1))
    return {"max_weight_difference": difference, "one_line_per_step": one_line_per_step, "same_metrics": lines == reference_lines,
            "ok": difference == 0.0 and one_line_per_step and lines == reference_lines}


def prepare_trial(stage: str, reference: Path, trial: Path) -> None:
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir(parents=True)
    for name in INPUTS[stage]:
        source = reference / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, trial / name)
    for name in STAGE_OUTPUTS.get(stage, []):
        target = trial / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/crash_resume")
    parser.add_argument("--kills", type=int, default=20, help="kills per stage")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--images_per_neutral_prompt", type=int, default=24)
    parser.add_argument("--train_steps", type=int, default=8)
    args = parser.parse_args()
    output_dir = Path(args.output_dir).resolve()
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    arguments = stage_arguments(images_per_neutral_prompt=args.images_per_neutral_prompt, images_per_identity_prompt=2, steps=4,
                                max_train_steps=args.train_steps, checkpointing_steps=1, batch_size=1)
    rng = random.Random(args.seed)

    reference = output_dir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    write_inputs(reference)
    durations = {}
    for stage in ("prompts", "generate", "classify", "score", "pairs", "train"):
        durations[stage] = run_to_end(stage_command(stage, arguments[stage]), reference)
        print(f"reference {stage}: {durations[stage]:.1f} s", flush=True)
    totals = {"generate": len(pd.read_csv(reference / "images/train/manifest.csv")), "classify": None, "score": None,
              "train": args.train_steps}
    totals["classify"] = totals["score"] = totals["generate"]

    results = {"command": " ".join(sys.argv), "kills_per_stage": args.kills, "reference_seconds": durations, "stages": {}}
    for stage in stages:
        trials = []
        for index in range(args.kills):
            trial = output_dir / "trials" / stage
            prepare_trial(stage, reference, trial)
            on_write = index % 4 == 3
            target = None if on_write else rng.randint(1, totals[stage] - 1)
            command = stage_command(stage, arguments[stage])
            kill = kill_during(stage, command, trial, target, timeout=4 * durations[stage] + 10)
            run_to_end(command, trial)
            left = writes_in_progress(trial)
            outcome = {"kill_at": "a write in progress" if on_write else f"{target} of {totals[stage]} done", **kill,
                       **compare(stage, trial, reference),
                       # the encoding cache is shared by every run on the same pairs, so no run deletes temporary
                       # files there (one may be another run's write under way); they are never read
                       "leftover_partial_after_resume": [path for path in left if not path.startswith(SHARED_CACHE)],
                       "leftover_in_shared_cache": [path for path in left if path.startswith(SHARED_CACHE)]}
            outcome["ok"] = outcome["ok"] and outcome["killed"] and not outcome["leftover_partial_after_resume"]
            trials.append(outcome)
            print(f"{stage} kill {index + 1}/{args.kills}: at {outcome['kill_at']} (progress {outcome['progress_at_kill']}, "
                  f"partial writes left {len(outcome['left_partial'])}) -> {'same as uninterrupted' if outcome['ok'] else outcome}",
                  flush=True)
        results["stages"][stage] = trials

    (output_dir / "crash_resume.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print("\n| stage | kills | inside a write (partial left) | resumed equal to uninterrupted | worst difference | temporary files left in the shared cache |")
    print("|---|---|---|---|---|---|")
    for stage, trials in results["stages"].items():
        inside = sum(bool(trial["left_partial"]) for trial in trials)
        equal = sum(trial["ok"] for trial in trials)
        if stage == "generate":
            worst = f"{max(trial['max_pixel_difference'] for trial in trials)} of 255 (pixel)"
        elif stage == "train":
            worst = f"{max(trial['max_weight_difference'] for trial in trials):g} (weight)"
        else:
            worst = "byte-identical" if equal == len(trials) else "differs"
        cache_left = sum(len(trial["leftover_in_shared_cache"]) for trial in trials)
        print(f"| {stage} | {len(trials)} | {inside} | {equal} | {worst} | {cache_left} |")
    print(f"\nwrote {output_dir / 'crash_resume.json'}")
    return 0 if all(trial["ok"] for trials in results["stages"].values() for trial in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
