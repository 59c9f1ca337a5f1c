"""No file the pipeline reads runs code: a pickle payload planted in each file of a finished run (images, tables,
JSON, the encoding cache, checkpoints with their optimizer and RNG states, the final weights) and of the model folder,
then every stage launched on it; the payload (unpickled, it would create a marker file) never runs. The stages may
refuse the planted file or skip it; they must not execute it."""

from __future__ import annotations

import pickle
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest

from bad_input_world import TOY_ENVIRONMENT, TOY_MODEL, build_world_apart, reset_accelerate, stage_arguments, stage_mains

pytestmark = pytest.mark.slow  # every stage, once per planted file


class Payload:
    """Unpickled, it creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = build_world_apart(tmp_path_factory.mktemp("payloads") / "world", max_train_steps=2, checkpointing_steps=1)
    shutil.copytree(TOY_MODEL, root / "model")
    return root


def representative_files(world: Path) -> list[str]:
    """Every file of the run, one per kind where there are many of a kind (images, cache entries, checkpoints:
    of the checkpoints, the files of the latest, the one a resume reads)."""
    chosen: OrderedDict[tuple, str] = OrderedDict()
    checkpoint_number = lambda part: int(part.split("-")[1]) if re.fullmatch(r"checkpoint-\d+", part) else -1  # noqa: E731
    for path in sorted(world.rglob("*"), key=lambda path: (max(checkpoint_number(part) for part in path.parts), str(path))):
        if not path.is_file():
            continue
        relative = path.relative_to(world)
        parts = relative.parts
        if "images" in parts[:3] and path.suffix == ".png":
            kind = (parts[0], parts[1], "png")
        elif "encoding_cache" in parts:
            kind = ("encoding_cache", parts[2], path.suffix)
        elif parts[0] == "report" and path.suffix == ".png":
            kind = ("report", "png")
        elif any(checkpoint_number(part) >= 0 for part in parts):
            kind = tuple("checkpoint-*" if checkpoint_number(part) >= 0 else part for part in parts)
            chosen[kind] = str(relative)  # sorted by checkpoint number: the latest stays
            continue
        else:
            kind = parts
        chosen.setdefault(kind, str(relative))
    return list(chosen.values())


def with_model(arguments: list[str], model: str) -> list[str]:
    return [model if argument == str(TOY_MODEL) else argument for argument in arguments]


def run_every_stage(world: Path) -> None:
    """Every stage on the run as it is (resuming where it can), and generation and training from the model folder."""
    arguments, mains = {stage: with_model(values, "model") for stage, values in stage_arguments(max_train_steps=3, checkpointing_steps=1).items()}, stage_mains()
    runs = [(stage, arguments[stage]) for stage in ("generate", "classify", "score", "pairs")]
    runs += [("train", [*arguments["train"], "--allow_setting_change"]),  # resumes from the last checkpoint
             ("evaluate", arguments["evaluate"]), ("report", arguments["report"]),
             ("generate", [*arguments["generate"][:-2], "--output_dir", "images/fresh", "--steps", "2", "--images_per_neutral_prompt", "1",
                           "--kinds", "neutral"]),
             ("train", [*arguments["train"], "--output_dir", "train/fresh", "--max_train_steps", "1"])]
    for stage, stage_arguments_ in runs:
        reset_accelerate()
        try:
            mains[stage](stage_arguments_)
        except BaseException:  # a refusal, an error, anything: only whether the payload ran matters
            pass
    reset_accelerate()


def test_the_run_has_every_kind_of_file(finished_run):
    files = representative_files(finished_run)
    for expected in ("images/train/manifest.csv", "train/popalign/checkpoint-2/optimizer.bin", "train/popalign/finished.json",
                     "model/unet/diffusion_pytorch_model.safetensors", "report/summary.csv"):
        assert expected in files or any(path.startswith(expected.rsplit("/", 1)[0]) for path in files), expected
    assert any("encoding_cache/latents" in path for path in files) and any("random_states" in path for path in files)


def test_no_planted_payload_runs(finished_run, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload_ran"
    payload = pickle.dumps(Payload(str(marker)))
    planted = representative_files(finished_run)
    assert len(planted) > 40
    for name in planted:
        world = tmp_path / "world"
        shutil.rmtree(world, ignore_errors=True)
        shutil.copytree(finished_run, world)
        (world / name).write_bytes(payload)
        monkeypatch.chdir(world)
        for variable, value in TOY_ENVIRONMENT.items():
            monkeypatch.setenv(variable, value)
        run_every_stage(world)
        capsys.readouterr()
        assert not marker.exists(), f"a payload planted in {name} ran"
