"""What a run meets besides bad flags: a second run on the same output, links planted in its folders, a full disk, a
read-only folder, Ctrl-C and SIGTERM, a model that draws nothing, guidance values that draw the same, a hub that
cannot be reached, the VAE of another model family.

Each case runs a stage's real entry point (in this process, or as a process of its own where a signal, a resource
limit or a lock held by another process is the point) in a copy of a small valid run of the whole pipeline
(tests/bad_input_world.py), and checks the one line it ends with and that nothing written before changed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bad_input_world import REPO_ROOT, TOY_ENVIRONMENT, TOY_MODEL, reset_accelerate, snapshot, stage_arguments, stage_mains
from popalign.io import InputError, read_jsonl
from popalign.toy.small_run import stage_command


@pytest.fixture
def world(small_run_copy):
    return small_run_copy


def run_main(stage: str, arguments: list[str], capsys) -> tuple[int, list[str]]:
    """Run a stage's entry point in this process: (exit code, the non-empty lines of its stderr)."""
    reset_accelerate()
    capsys.readouterr()
    try:
        code = stage_mains()[stage](arguments)
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def with_flags(stage: str, **flags) -> list[str]:
    """The stage's arguments in the small run, with `--flag value` replaced or added."""
    arguments = list(stage_arguments()[stage])
    for flag, value in flags.items():
        if f"--{flag}" in arguments:
            arguments[arguments.index(f"--{flag}") + 1] = value
        else:
            arguments += [f"--{flag}", value]
    return arguments


def subprocess_environment(**variables) -> dict:
    return {**os.environ, **TOY_ENVIRONMENT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **variables}


# ----- one run per output ------------------------------------------------------------------------------------------

HOLD_LOCK = "import sys, time\nfrom popalign.locks import output_lock\nwith output_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(300)\n"


@contextlib.contextmanager
def lock_held_by_another_process(world: Path, folder: str, name: str):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, folder, name], cwd=world, stdout=subprocess.PIPE, text=True,
                              env=subprocess_environment())
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# (stage, flags, the lock's folder and name, files removed first so that the stage has work to do)
LOCKED_STAGES = [
    ("prompts", {}, "prompts", "train.csv", ()),
    ("generate", {}, "images/train", "generation", ()),
    ("classify", {}, "images/train", "labels_toy", ("images/train/labels_toy.csv",)),
    ("score", {}, "images/train", "quality_toy", ("images/train/quality_toy.csv",)),
    ("pairs", {}, "preferences", "pairs.csv", ()),
    ("train", {"output_dir": "train/new"}, "train/new", "training", ()),
]


@pytest.mark.parametrize("stage, flags, folder, name, removed", LOCKED_STAGES, ids=[case[0] for case in LOCKED_STAGES])
def test_a_second_run_on_the_same_output_stops_at_once_naming_the_first(world, capsys, stage, flags, folder, name, removed):
    for path in removed:
        (world / path).unlink()
    with lock_held_by_another_process(world, folder, name) as holder:
        before = snapshot(world)
        code, lines = run_main(stage, with_flags(stage, **flags), capsys)
        assert code == 2, lines
        assert len(lines) == 1 and lines[0].startswith(f"error: {folder}: another run is writing here (pid {holder.pid} "), lines
        assert snapshot(world) == before


@pytest.mark.parametrize("stage, flags, folder, name", [("generate", {}, "images/train", "generation"),
                                                      ("train", {"output_dir": "train/popalign"}, "train/popalign", "training")])
def test_the_check_before_a_launch_finds_a_run_writing_there(world, capsys, stage, flags, folder, name):
    """--validate_only (what 2_generate_images.sh and 4_train.sh run before `accelerate launch`) sees the lock too."""
    with lock_held_by_another_process(world, folder, name) as holder:
        before = snapshot(world)
        code, lines = run_main(stage, with_flags(stage, **flags) + ["--validate_only"], capsys)
        assert code == 2 and len(lines) == 1 and f"another run is writing here (pid {holder.pid} " in lines[0], lines
        assert snapshot(world) == before
    code, lines = run_main(stage, with_flags(stage, **flags) + ["--validate_only"], capsys)
    assert code == 0, lines


def test_the_lock_of_a_killed_run_is_free_at_once(world, capsys):
    """SIGKILL leaves the lock file behind, but not the lock: the same command then runs."""
    with lock_held_by_another_process(world, "images/train", "generation"):
        pass  # killed on leaving
    assert (world / "images/train/.generation.lock").exists()
    code, lines = run_main("generate", stage_arguments()["generate"], capsys)
    assert code == 0, lines
    assert not (world / "images/train/.generation.lock").exists()  # an ending run removes its lock file


def test_pairs_and_their_summary_are_one_unit(world):
    summary = json.loads((world / "preferences/pairs.summary.json").read_text())
    assert summary["pairs_sha256"] == hashlib.sha256((world / "preferences/pairs.csv").read_bytes()).hexdigest()


# ----- no writes through links ------------------------------------------------------------------------------------

def plant_link(world: Path, path: str) -> Path:
    outside = world.parent / "outside.txt"
    outside.write_text("someone else's file\n")
    (world / path).unlink(missing_ok=True)
    (world / path).parent.mkdir(parents=True, exist_ok=True)
    (world / path).symlink_to(outside)
    return outside


@pytest.mark.parametrize("stage, flags, link, removed", [
    ("classify", {}, "images/train/.labels_toy.part0.jsonl", "images/train/labels_toy.csv"),
    ("score", {}, "images/train/.quality_toy.part0.jsonl", "images/train/quality_toy.csv"),
    ("train", {"output_dir": "train/new"}, "train/new/metrics.jsonl", None),
], ids=["classification part file", "scoring part file", "training metrics"])
def test_a_link_planted_in_a_run_folder_is_named_and_not_written_through(world, capsys, stage, flags, link, removed):
    if removed:
        (world / removed).unlink()
    outside = plant_link(world, link)
    code, lines = run_main(stage, with_flags(stage, **flags), capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: {link}: is a symbolic link"), lines
    assert outside.read_text() == "someone else's file\n"


def test_a_part_file_is_never_opened_through_a_link(tmp_path):
    from popalign.image_jobs import ImageJob

    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    job = ImageJob(tmp_path / "folder", "labels_toy")
    job.out_dir.mkdir()
    job.part_path(0).symlink_to(outside)
    with pytest.raises(InputError, match=r"\.labels_toy\.part0\.jsonl: is a symbolic link"):
        job.open_part_for_append(0)
    assert outside.read_text() == ""


def test_a_chart_is_never_written_through_a_link_and_never_left_half_written(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from popalign.io import atomic_save_figure

    figure, panel = plt.subplots(figsize=(2, 2))
    panel.plot([0, 1], [0, 1])
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"someone else's file")
    (tmp_path / "report").mkdir()
    (tmp_path / "report/chart_gender.png").symlink_to(outside)
    with pytest.raises(InputError, match=r"chart_gender\.png: is a symbolic link"):
        atomic_save_figure(figure, tmp_path / "report/chart_gender.png")
    assert outside.read_bytes() == b"someone else's file"
    # A figure that fails while drawing leaves no file under its name, nor a temporary one beside it.
    broken, broken_panel = plt.subplots(figsize=(2, 2))
    broken_panel.set_title("$\\frac{1}{$", usetex=False)
    with pytest.raises(ValueError):
        atomic_save_figure(broken, tmp_path / "report/chart_race.png")
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == ["chart_gender.png"]
    atomic_save_figure(figure, tmp_path / "report/chart_age.png", dpi=50)
    with Image.open(tmp_path / "report/chart_age.png") as image:
        assert image.format == "PNG" and image.size == (100, 100)
    plt.close("all")


# ----- a full disk, a file-size limit, a read-only folder ---------------------------------------------------------

@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A small tmpfs at `folder` (needs the right to mount: root here); the test is skipped where mounting is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write a file in `folder` until its file system has no block left."""
    handle = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(handle, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(handle)


def test_a_full_disk_is_one_line_naming_the_file_and_the_previous_files_stay(world, capsys):
    with tmpfs(world / "full", "size=1m") as full:
        for name in ("pairs.csv", "pairs.summary.json"):
            shutil.copy(world / "preferences" / name, full / name)
        fill(full)
        previous = {name: (full / name).read_bytes() for name in ("pairs.csv", "pairs.summary.json")}
        code, lines = run_main("pairs", with_flags("pairs", output="full/pairs.csv"), capsys)
        assert code == 2, lines
        assert len(lines) == 1 and lines[0].startswith("error: full/pairs.csv: cannot write (no space left on the device)"), lines
        assert {name: (full / name).read_bytes() for name in previous} == previous
        assert sorted(path.name for path in full.iterdir()) == ["filler", "pairs.csv", "pairs.summary.json"]


def test_a_full_disk_under_the_training_encoding_cache_is_one_line(world, capsys):
    with tmpfs(world / "full", "size=1m") as full:
        fill(full)
        code, lines = run_main("train", with_flags("train", output_dir="train/new", cache_dir="full/cache"), capsys)
        assert code == 2, lines
        assert lines[-1].startswith("error: full/cache/") and "cannot write (no space left on the device)" in lines[-1], lines
        assert not any("Traceback" in line for line in lines)


def test_a_file_size_limit_is_one_line_naming_the_file_and_the_previous_files_stay(world):
    """EFBIG, the error a write past RLIMIT_FSIZE gets (with SIGXFSZ ignored), in a process of its own."""
    previous = snapshot(world / "preferences")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))

    completed = subprocess.run(stage_command("pairs", with_flags("pairs", num_iterations="200")), cwd=world, capture_output=True,
                               text=True, env=subprocess_environment(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=limit_file_size)
    assert completed.returncode == 2, completed.stderr[-2000:]
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("error: preferences/pairs.csv: cannot write (file too large for the file system)"), line
    assert snapshot(world / "preferences") == previous


def test_a_part_file_past_the_file_size_limit_is_one_line_and_the_lines_before_stay(world):
    """Classification appends one line per image to its part file: past RLIMIT_FSIZE the append fails (EFBIG)."""
    folder = world / "images/train"
    (folder / "labels_toy.csv").unlink()
    (folder / ".labels_toy.part0.jsonl").write_text("")
    (folder / ".labels_toy.settings.json").unlink()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    completed = subprocess.run(stage_command("classify", with_flags("classify", batch_size="4")), cwd=world, capture_output=True, text=True,
                               env=subprocess_environment(PYTHONDONTWRITEBYTECODE="1"), preexec_fn=limit_file_size)
    assert completed.returncode == 2, completed.stderr[-2000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: images/train/.labels_toy.part0.jsonl: cannot write (file too large for the file system)"), last
    assert "Traceback" not in completed.stderr
    written = read_jsonl([folder / ".labels_toy.part0.jsonl"])  # a line cut at the limit is left out, as a resume reads it
    assert written and len(written) < len(pd.read_csv(folder / "manifest.csv"))  # the batches before the limit are kept


def test_a_read_only_output_folder_is_refused_before_any_work(world, capsys):
    with tmpfs(world / "readonly", "size=64k,ro") as readonly:
        code, lines = run_main("generate", with_flags("generate", output_dir="readonly/images"), capsys)
        assert code == 2, lines
        assert lines == ["error: --output_dir readonly/images: readonly is not writable (read-only file system)"]
        code, lines = run_main("prompts", with_flags("prompts", output="readonly/prompts.csv"), capsys)
        assert code == 2 and lines == ["error: --output readonly/prompts.csv: readonly is not writable (read-only file system)"], lines
        assert list(readonly.iterdir()) == []


# ----- Ctrl-C and SIGTERM -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("signal_number, exit_code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_an_interrupted_stage_ends_with_one_line_saying_how_to_resume(world, signal_number, exit_code, name):
    arguments = with_flags("generate", output_dir="images/long", images_per_neutral_prompt="400", batch_size="1", kinds="neutral")
    # Ctrl-C as in a terminal: a suite started in the background of a non-interactive shell hands its children SIGINT
    # ignored, and Python then never turns it into KeyboardInterrupt; the stage gets the disposition a terminal gives.
    process = subprocess.Popen(stage_command("generate", arguments), cwd=world, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=subprocess_environment(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((world / "images/long").glob("images/*/*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == f"error: interrupted ({name}); what was finished is kept: run the same command again to resume"
    written = list((world / "images/long").glob("images/*/*.png"))
    assert written and all(Image.open(path).size == (32, 32) for path in written)


def test_every_stage_ends_an_interrupt_through_the_same_wrapper():
    """The signal test above runs generation; every other entry point is the same wrapper around its main."""
    from popalign.io import exit_2_on_input_error

    wrapper_code = exit_2_on_input_error(print).__code__
    assert {stage: main.__code__ is wrapper_code for stage, main in stage_mains().items()} == {stage: True for stage in stage_mains()}


# ----- a model that draws nothing, guidance that draws the same -------------------------------------------------

def test_a_model_that_draws_nan_stops_generation_before_any_image(world, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(world / "train/popalign/unet", world / "nan_unet")
    weights_path = world / "nan_unet/diffusion_pytorch_model.safetensors"
    save_file({name: torch.full_like(tensor, float("nan")) for name, tensor in load_file(weights_path).items()}, weights_path)
    code, lines = run_main("generate", with_flags("generate", output_dir="images/nan", unet="nan_unet"), capsys)
    assert code == 2, lines
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]  # the rest: progress bars
    assert errors == lines[-1:] and errors[0].startswith("error: the model draws nothing: every image of a batch is not finite"), lines
    assert "--unet nan_unet" in errors[0]
    assert not list((world / "images/nan").glob("images/*/*.png"))


def test_a_batch_of_flat_images_is_found_and_one_drawn_image_is_enough():
    from popalign.generate import blank_batch_problem

    flat = np.full((3, 8, 8, 3), 0.25)
    assert blank_batch_problem(flat) == "one flat colour"
    assert blank_batch_problem(np.full((2, 8, 8, 3), np.nan)) == "not finite (NaN or infinity)"
    drawn = flat.copy()
    drawn[1, 2, 2] = 0.9
    assert blank_batch_problem(drawn) is None
    mixed = np.concatenate([np.full((1, 8, 8, 3), np.nan), flat[:1]])
    assert blank_batch_problem(mixed) == "one flat colour"


def test_guidance_values_that_draw_the_same_are_one_setting(world, capsys):
    arguments = dict(output_dir="images/guidance", kinds="neutral", images_per_neutral_prompt="1")
    assert run_main("generate", with_flags("generate", guidance="0.5", **arguments), capsys)[0] == 0
    assert json.loads((world / "images/guidance/generation_config.json").read_text())["guidance"] == 1.0
    assert set(pd.read_csv(world / "images/guidance/manifest.csv")["guidance"]) == {1.0}
    before = snapshot(world / "images/guidance")
    for same in ("0", "1.0"):
        assert run_main("generate", with_flags("generate", guidance=same, **arguments), capsys)[0] == 0
    assert snapshot(world / "images/guidance") == before
    code, lines = run_main("generate", with_flags("generate", guidance="2.0", **arguments), capsys)
    assert code == 2 and "--guidance 1.0 -> 2.0" in lines[0], lines


def test_a_folder_without_any_face_is_said_in_one_warning(world, capsys):
    shutil.copytree(world / "images/train", world / "images/blank")
    for name in ("labels_toy.csv", ".labels_toy.settings.json", ".labels_toy.part0.jsonl"):
        (world / "images/blank" / name).unlink()
    for path in (world / "images/blank").glob("images/*/*.png"):
        Image.new("RGB", (32, 32), (128, 128, 128)).save(path)
    code, lines = run_main("classify", with_flags("classify", output_dir="images/blank"), capsys)
    assert code == 0, lines
    assert [line for line in lines if line.startswith("warning:")] == [
        f"warning: images/blank: no face found in any of its {len(pd.read_csv(world / 'images/blank/manifest.csv'))} images by the toy "
        "classifier; check that the model draws people (step 3 and the evaluation count only images with a face)"]


# ----- the hub, the VAE -----------------------------------------------------------------------------------------

def test_a_hub_id_that_cannot_be_reached_is_one_line_at_once(world, capsys, monkeypatch):
    import popalign.io

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(popalign.io, "_HUB_PROBES", {})
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    code, lines = run_main("generate", with_flags("generate", pretrained_model_name_or_path="someorg/some-model", output_dir="images/hub"), capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: --model someorg/some-model: not a local folder, not in the Hugging Face "
                                                   "cache, and the hub cannot be reached (http://127.0.0.1:9: "), lines
    assert time.monotonic() - started < 10
    assert not (world / "images/hub").exists()


def test_the_default_vae_follows_the_base_model(tmp_path):
    from popalign.training.config import TrainConfig
    from popalign.training.models import AUTO_VAE, SDXL_FP16_FIX_VAE, resolve_vae

    assert TrainConfig().vae == AUTO_VAE
    assert resolve_vae(str(TOY_MODEL), AUTO_VAE) == ""  # an SD-shaped base encodes with its own VAE
    sdxl_like = tmp_path / "sdxl" / "unet"
    sdxl_like.mkdir(parents=True)
    config = json.loads((TOY_MODEL / "unet/config.json").read_text())
    (sdxl_like / "config.json").write_text(json.dumps({**config, "addition_embed_type": "text_time"}))
    assert resolve_vae(str(sdxl_like.parent), AUTO_VAE) == SDXL_FP16_FIX_VAE
    assert resolve_vae(str(TOY_MODEL), "my/vae") == "my/vae"
