"""Run folder layout, resumable checkpoints and the final weights.

    <output_dir>/train_config.json          the run's hyperparameters
    <output_dir>/metrics.jsonl              one line of training statistics per optimizer step
    <output_dir>/logs/                      tracker files (TensorBoard)
    <output_dir>/checkpoint-<step>/         accelerator state + train_config.json + trainer_state.json
    <output_dir>/unet/                      final U-Net (full fine-tuning), diffusers format
    <output_dir>/pytorch_lora_weights.safetensors   final LoRA (load with pipeline.load_lora_weights)
    <output_dir>/finished.json              written after the final weights: what they were trained from

A checkpoint is written to `checkpoint-<step>.partial` and renamed when complete, so a run killed
while saving never leaves a checkpoint that `--resume_from_checkpoint latest` would pick. A run
launched again on a folder whose finished.json records the same training (the same settings, the
same pairs file content, the same base U-Net files) does nothing: re-running a pipeline script does
not retrain a model that is already there. The same settings on a changed pairs file or base U-Net
train again (the data upstream was remade); other training settings are refused, naming them, unless
--allow_setting_change says the finished model may be replaced.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from popalign.io import InputError, atomic_write_json, atomic_write_text, open_for_append, write_faults_named

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics.jsonl"
LORA_CHECKPOINT_NAME = "unet_lora.safetensors"
FINISHED_NAME = "finished.json"
# Settings that say how a run is carried out, not what it trains: they do not enter the fingerprint.
RUN_CONTROL_SETTINGS = frozenset({
    "output_dir", "cache_dir", "max_memory_cache_gb", "vae_encode_batch_size", "torch_threads", "fsdp", "checkpointing_steps",
    "checkpoints_total_limit", "resume_from_checkpoint", "allow_setting_change", "validate_only", "push_to_hub", "hub_model_id", "stop_after_steps", "report_to", "tracker_project",
})


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder as (step, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume_checkpoint(output_dir: str | Path, resume_from: str) -> Optional[Path]:
    """'' -> None; 'latest' -> newest complete checkpoint or None; otherwise that folder, as a path or (as in the
    diffusers training examples) a name inside `output_dir`: it must exist."""
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file() and (Path(output_dir) / resume_from / TRAINER_STATE).is_file():
        path = Path(output_dir) / resume_from
    if not (path / TRAINER_STATE).is_file():
        raise InputError(f"--resume_from_checkpoint {resume_from}: not a complete checkpoint folder (no {TRAINER_STATE})")
    return path


def read_checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])


def prune_checkpoints(output_dir: str | Path, keep: int, exempt_steps: frozenset[int] = frozenset()) -> list[Path]:
    """Delete the oldest checkpoints so that at most `keep` remain besides those of `exempt_steps` (the best one so far,
    popalign.training.validation), which are never deleted (keep 0 = no limit); return the deleted."""
    if keep <= 0:
        return []
    checkpoints = [(step, path) for step, path in list_checkpoints(output_dir) if step not in exempt_steps]
    doomed = [path for _, path in checkpoints[: max(0, len(checkpoints) - keep)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def partial_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.partial"


def finish_checkpoint(output_dir: str | Path, step: int, config_json: str) -> Path:
    """Add the config and step to a fully written partial checkpoint and give it its final name."""
    partial = partial_checkpoint_dir(output_dir, step)
    atomic_write_text(partial / CONFIG_NAME, config_json)
    atomic_write_json(partial / TRAINER_STATE, {"global_step": step})
    final = Path(output_dir) / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return final


def _file_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def training_fingerprint(settings: dict, pairs_file: str | Path, pretrained_model: str) -> dict:
    """What a finished run was trained from: its training settings (training_settings), the pairs file's
    sha256, and the size and modification time of the base U-Net's files when it is a local folder."""
    from popalign.training.cache import file_sha256

    unet_dir = Path(pretrained_model) / "unet"
    unet_files = {path.name: _file_stamp(path) for path in sorted(unet_dir.iterdir()) if path.is_file()} if unet_dir.is_dir() else {}
    return {"settings": dict(sorted(training_settings(settings).items())),
            "pairs_sha256": file_sha256(Path(pairs_file)), "pretrained_unet_files": unet_files}


def finished_weights(output_dir: str | Path, fingerprint: dict) -> Optional[tuple[Path, int]]:
    """(final weights, last step) of a finished run trained from `fingerprint` in this folder, or None."""
    marker = Path(output_dir) / FINISHED_NAME
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stored = record.get("fingerprint") if isinstance(record, dict) else None
    if isinstance(stored, dict) and isinstance(stored.get("settings"), dict):
        stored = {**stored, "settings": dict(sorted(with_later_defaults(stored["settings"]).items()))}
    if not isinstance(record, dict) or stored != json.loads(json.dumps(fingerprint)) or not record.get("weights"):
        return None
    weights = Path(output_dir) / str(record["weights"])
    return (weights, int(record.get("global_step", 0))) if weights.exists() else None


def mark_finished(output_dir: str | Path, fingerprint: dict, weights: Path, global_step: int, best: Optional[dict] = None) -> None:
    """finished.json: what the run was trained from, its final weights and step, and with validation the best
    checkpoint ({"step", "weights", "lora" (the weights are a LoRA folder), "rule"}; step and weights null when no
    validation was eligible)."""
    record = {"fingerprint": fingerprint, "weights": str(Path(weights).relative_to(output_dir)), "global_step": global_step}
    if best is not None:
        record["best"] = best
    atomic_write_json(Path(output_dir) / FINISHED_NAME, record)


def checkpoint_weights(output_dir: str | Path, step: int, lora: bool) -> Path:
    """The weights of checkpoint-<step> as eval.sh loads them: its unet/ folder, or the folder of its LoRA file."""
    folder = Path(output_dir) / f"checkpoint-{step}"
    return folder if lora else folder / "unet"


def best_weights(output_dir: str | Path) -> tuple[str, Path]:
    """("unet" | "lora", path) of the best checkpoint that finished.json names (InputError when there is none)."""
    marker = Path(output_dir) / FINISHED_NAME
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{output_dir}: no finished run ({FINISHED_NAME} missing or unreadable)") from None
    best = record.get("best") if isinstance(record, dict) else None
    if not isinstance(best, dict) or not best.get("weights"):
        raise InputError(f"{marker}: names no best checkpoint (trained without --validation_prompts_file, or no validation was eligible)")
    path = Path(output_dir) / str(best["weights"])
    return ("lora" if best.get("lora") else "unet"), path


def main(argv=None) -> int:
    """`python -m popalign.training.checkpoints best RUN_DIR` prints "unet PATH" or "lora PATH" of the run's best
    checkpoint (eval.sh's TUNED_MODELS kind best)."""
    import sys

    from popalign.io import exit_2_on_input_error

    @exit_2_on_input_error
    def run(arguments) -> int:
        if len(arguments) != 2 or arguments[0] != "best":
            raise InputError("usage: python -m popalign.training.checkpoints best RUN_DIR")
        kind, path = best_weights(arguments[1])
        print(f"{kind} {path}")
        return 0

    return run(sys.argv[1:] if argv is None else argv)


def trim_metrics(output_dir: str | Path, global_step: int) -> int:
    """Keep in <output_dir>/metrics.jsonl only the lines of steps <= `global_step` (the step a run resumes from, 0 for
    a new one), so that steps logged after the last checkpoint of a killed run, and a line cut short by the kill, are
    not there twice once the run goes on: one line per step. Returns the number of lines dropped."""
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if isinstance(step, int) and step <= global_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def finished_run_differences(output_dir: str | Path, settings: dict) -> Optional[dict[str, tuple]]:
    """{setting: (the finished run's value, value now)} for every training setting that differs from those of the
    finished run `output_dir` holds; None when it holds none."""
    try:
        record = json.loads((Path(output_dir) / FINISHED_NAME).read_text(encoding="utf-8"))
        then = with_later_defaults(record["fingerprint"]["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(then, dict):
        return None
    now = training_settings(json.loads(json.dumps(settings)))
    return {name: (then.get(name), now.get(name)) for name in sorted(set(now) | set(then)) if then.get(name) != now.get(name)}


def clear_finished(output_dir: str | Path) -> None:
    """A run that starts training in this folder is no longer the finished one it may hold."""
    (Path(output_dir) / FINISHED_NAME).unlink(missing_ok=True)


SETTINGS_CHANGES_NAME = "settings_changes.jsonl"


def with_later_defaults(stored: dict) -> dict:
    """Training settings stored by an earlier version, with every setting added since at its default: what that run
    trained with (a new flag defaults to the behaviour before it), so an older run still resumes and is still finished."""
    if not isinstance(stored, dict):
        return stored
    from popalign.training.config import TrainConfig

    return {**training_settings(json.loads(TrainConfig().to_json())), **stored}


def training_settings(settings: dict) -> dict:
    """The settings that decide what a run trains: all but RUN_CONTROL_SETTINGS and the validation's (which measure the
    weights without changing them)."""
    return {name: value for name, value in settings.items()
            if name not in RUN_CONTROL_SETTINGS and not name.startswith(("validation_", "num_validation_", "best_checkpoint_"))}


def settings_differences(checkpoint: Path, settings: dict) -> dict[str, tuple]:
    """{setting: (value in the checkpoint, value now)} for every training setting that differs."""
    path = Path(checkpoint) / CONFIG_NAME
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read the checkpoint's settings ({error})") from None
    if not isinstance(stored, dict):
        raise InputError(f"{path}: not a settings object")
    now, then = training_settings(settings), with_later_defaults(training_settings(stored))
    return {name: (then.get(name), now.get(name)) for name in sorted(set(now) | set(then)) if then.get(name) != now.get(name)}


def describe_differences(differences: dict[str, tuple]) -> str:
    return ", ".join(f"--{name} {then!r} -> {now!r}" for name, (then, now) in differences.items())


def record_settings_change(output_dir: str | Path, checkpoint: Path, step: int, differences: dict[str, tuple]) -> None:
    """Append to <output_dir>/settings_changes.jsonl what a forced resume changed, and from which checkpoint."""
    with write_faults_named(Path(output_dir) / SETTINGS_CHANGES_NAME), open_for_append(Path(output_dir) / SETTINGS_CHANGES_NAME) as stream:
        stream.write(json.dumps({"resumed_from": str(checkpoint), "step": step,
                                 "changes": {name: {"checkpoint": then, "now": now} for name, (then, now) in differences.items()}}) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
