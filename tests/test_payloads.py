"""No file the pipeline reads runs code: a pickle payload planted in each file of a finished run (images, tables,
JSON, the encoding cache, checkpoints with their optimizer and RNG states, the final weights) and of the model folder,
then every stage launched on it; the payload (unpickled, it would create a marker file) never runs. The stages may
refuse the planted file or skip it; they must not execute it.

Several files are planted in one run where they cannot hide each other. A payload can only hide another from a stage
that reads both: the first one read stops the stage (a refusal, an error) before it reaches the second. So a run of
every stage on the clean copy first records which stage reads which file (by the access time of a hard link to each
file: a read by any library counts, also of a file the stage then replaces), and files go into one run only if no
stage reads two of them. Each such run records the reads again: a planted file that a stage read in the clean run
but not in this one (a stage stopped earlier, or an earlier stage's reaction to another payload changed what it did)
gets a run of its own, as does every file where access times are not kept."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest

from bad_input_world import TOY_ENVIRONMENT, TOY_MODEL, build_world_apart, reset_accelerate, stage_arguments, stage_mains

pytestmark = pytest.mark.slow  # every stage, once per group of planted files


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


def access_times_kept(folder: Path) -> bool:
    """Whether reading a file in `folder` moves its access time (not on a noatime mount)."""
    probe = folder / "access_time_probe"
    probe.write_bytes(b"probe")
    os.utime(probe, ns=(0, probe.stat().st_mtime_ns))
    probe.read_bytes()
    kept = probe.stat().st_atime_ns != 0
    probe.unlink()
    return kept


def clear_access_times(world: Path, links: Path) -> dict[str, Path]:
    """Every file's access time set to 0 (modification times kept) and a hard link to it in `links`, which keeps the
    file a stage reads even if the stage then replaces or deletes it: {relative path: link}."""
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir()
    linked = {}
    for path in sorted(world.rglob("*")):
        if path.is_file() and not path.is_symlink():
            os.utime(path, ns=(0, path.stat().st_mtime_ns))
            link = links / str(len(linked))
            os.link(path, link)
            linked[str(path.relative_to(world))] = link
    return linked


def read_since(linked: dict[str, Path]) -> set[str]:
    """The files of `linked` read since clear_access_times (their access time moved)."""
    return {name for name, link in linked.items() if link.stat().st_atime_ns != 0}


def run_every_stage(world: Path) -> list[set[str]]:
    """Every stage on the run as it is (resuming where it can), and generation and training from the model folder;
    returns the files each stage run read."""
    arguments, mains = {stage: with_model(values, "model") for stage, values in stage_arguments(max_train_steps=3, checkpointing_steps=1).items()}, stage_mains()
    runs = [(stage, arguments[stage]) for stage in ("generate", "classify", "score", "pairs")]
    runs += [("train", [*arguments["train"], "--allow_setting_change"]),  # resumes from the last checkpoint
             ("evaluate", arguments["evaluate"]), ("report", arguments["report"]),
             ("generate", [*arguments["generate"][:-2], "--output_dir", "images/fresh", "--steps", "2", "--images_per_neutral_prompt", "1",
                           "--kinds", "neutral"]),
             ("train", [*arguments["train"], "--output_dir", "train/fresh", "--max_train_steps", "1"])]
    reads, links = [], world.parent / "links"
    for stage, stage_arguments_ in runs:
        linked = clear_access_times(world, links)
        reset_accelerate()
        try:
            mains[stage](stage_arguments_)
        except BaseException:  # a refusal, an error, anything: only whether the payload ran matters
            pass
        reads.append(read_since(linked))
    reset_accelerate()
    shutil.rmtree(links)
    return reads


def readers(reads: list[set[str]], name: str) -> set[int]:
    """The stage runs that read `name`."""
    return {index for index, files in enumerate(reads) if name in files}


def groups_apart(names: list[str], clean_reads: list[set[str]]) -> list[list[str]]:
    """`names` in groups of files no stage run read two of (first fit, in order)."""
    groups: list[tuple[list[str], set[int]]] = []
    for name in names:
        stages = readers(clean_reads, name)
        for members, taken in groups:
            if not stages & taken:
                members.append(name)
                taken |= stages
                break
        else:
            groups.append(([name], set(stages)))
    return [members for members, _ in groups]


def test_the_run_has_every_kind_of_file(finished_run):
    files = representative_files(finished_run)
    for expected in ("images/train/manifest.csv", "train/popalign/checkpoint-2/optimizer.bin", "train/popalign/finished.json",
                     "model/unet/diffusion_pytorch_model.safetensors", "report/summary.csv"):
        assert expected in files or any(path.startswith(expected.rsplit("/", 1)[0]) for path in files), expected
    assert any("encoding_cache/latents" in path for path in files) and any("random_states" in path for path in files)


def test_no_planted_payload_runs(finished_run, tmp_path, monkeypatch, capsys):
    planted = representative_files(finished_run)
    assert len(planted) > 40
    for variable, value in TOY_ENVIRONMENT.items():
        monkeypatch.setenv(variable, value)

    def run(names: list[str]) -> list[set[str]]:
        """A copy of the finished run with a payload in each of `names`, every stage on it: the files each stage run read."""
        world = tmp_path / "world"
        shutil.rmtree(world, ignore_errors=True)
        shutil.copytree(finished_run, world)
        markers = {name: tmp_path / f"payload_ran_{index}" for index, name in enumerate(names)}
        for name, marker in markers.items():
            (world / name).write_bytes(pickle.dumps(Payload(str(marker))))
        monkeypatch.chdir(world)
        reads = run_every_stage(world)
        capsys.readouterr()
        for name, marker in markers.items():
            assert not marker.exists(), f"a payload planted in {name} ran"
        return reads

    if not access_times_kept(tmp_path):  # reads cannot be seen: every file on its own
        for name in planted:
            run([name])
        return
    clean_reads = run([])
    # reads by Python and by other libraries (the U-Net's weights are memory-mapped by safetensors) are seen
    for name in ("preferences/pairs.csv", "images/train/manifest.csv", "model/unet/diffusion_pytorch_model.safetensors"):
        assert readers(clean_reads, name), f"no stage read {name} in the clean run"
    alone = []
    for group in groups_apart(planted, clean_reads):
        reads = run(group)
        if len(group) > 1:
            alone += [name for name in group if not readers(clean_reads, name) <= readers(reads, name)]
    for name in alone:  # a stage that read it in the clean run did not with the others planted: on its own
        run([name])
