"""Scoring a generated image folder: output file, resume, settings check, sharding over processes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from popalign.io import InputError
from popalign.score import build_scorer
from popalign.score.run import QUALITY_COLUMNS, quality_path, score_image_folder
from popalign.score.tiny import build_tiny_aesthetic_weights
from popalign.tiny_models import build_tiny_clip_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a photo of a doctor", 'a nurse, "reading" an x-ray', "une infirmière à l'hôpital"]


@pytest.fixture(scope="session")
def tiny_options(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_quality_runner")
    clip_path = str(build_tiny_clip_model(root / "clip"))
    weights = str(build_tiny_aesthetic_weights(root / "aesthetic.pth", embedding_dim=16))
    return {"clip": {"model": clip_path}, "aesthetic": {"clip_model": clip_path, "weights": weights}}


def make_folder(path, count=7):
    """An image folder as generation writes it: images/<prompt>/<index>.png and manifest.csv."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        image_path = f"images/p{index % 3}/{index:05d}.png"
        (path / image_path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(path / image_path)
        rows.append({"image_path": image_path, "prompt_id": f"p{index % 3}", "prompt": PROMPTS[index % 3], "image_index": index})
    pd.DataFrame(rows).to_csv(path / "manifest.csv", index=False)
    return path


def read_scores(out_dir, name):
    return pd.read_csv(quality_path(out_dir, name), dtype={"prompt": str}, keep_default_na=False)


def test_writes_one_row_per_manifest_image_in_order(tmp_path, tiny_options):
    out_dir = make_folder(tmp_path / "folder")
    written = score_image_folder(out_dir, ["clip", "aesthetic"], batch_size=3, scorer_options=tiny_options, device="cpu")
    assert set(written) == {"clip", "aesthetic"}
    manifest = pd.read_csv(out_dir / "manifest.csv", keep_default_na=False)
    scorer = build_scorer("clip", device="cpu", **tiny_options["clip"])
    images = [Image.open(out_dir / image_path).convert("RGB") for image_path in manifest["image_path"]]
    expected = scorer.score(images, list(manifest["prompt"]))
    frame = read_scores(out_dir, "clip")
    assert list(frame.columns) == QUALITY_COLUMNS
    assert list(frame["image_path"]) == list(manifest["image_path"])
    assert list(frame["prompt"]) == list(manifest["prompt"])  # quotes, commas and accents survive
    assert frame["score"].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert set(frame["scorer"]) == {"clip"} and set(frame["scorer_description"]) == {scorer.description}
    assert len(read_scores(out_dir, "aesthetic")) == len(manifest)


def test_resume_skips_rows_already_in_part_files(tmp_path, tiny_options):
    out_dir = make_folder(tmp_path / "folder")
    manifest = pd.read_csv(out_dir / "manifest.csv")
    done = list(manifest["image_path"][:2])
    # rows a killed run left behind, the last line cut off mid-write
    part = out_dir / ".quality_clip.part1.jsonl"
    part.write_text("".join(json.dumps({"image_path": path, "prompt": "p", "score": -123.0}) + "\n" for path in done)
                    + '{"image_path": "images/p2/000', encoding="utf-8")
    score_image_folder(out_dir, ["clip"], batch_size=2, scorer_options={"clip": tiny_options["clip"]}, device="cpu")
    frame = read_scores(out_dir, "clip").set_index("image_path")
    assert frame.loc[done, "score"].tolist() == [-123.0, -123.0]  # kept, not recomputed
    assert (frame.drop(index=done)["score"] >= 0).all()  # the others were scored (CLIP score >= 0)
    assert len(frame) == len(manifest)


def test_complete_file_is_skipped_without_loading_the_model(tmp_path, tiny_options):
    out_dir = make_folder(tmp_path / "folder", count=3)
    model_copy = tmp_path / "clip_copy"
    shutil.copytree(tiny_options["clip"]["model"], model_copy)
    options = {"clip": {"model": str(model_copy)}}
    score_image_folder(out_dir, ["clip"], batch_size=4, scorer_options=options, device="cpu")
    before = quality_path(out_dir, "clip").read_bytes()
    shutil.rmtree(model_copy)  # loading the model now would fail
    score_image_folder(out_dir, ["clip"], batch_size=4, scorer_options=options, device="cpu")
    assert quality_path(out_dir, "clip").read_bytes() == before


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_options):
    out_dir = make_folder(tmp_path / "folder", count=3)
    score_image_folder(out_dir, ["clip"], batch_size=4, scorer_options={"clip": tiny_options["clip"]}, device="cpu")
    other_model = tmp_path / "other_clip"
    shutil.copytree(tiny_options["clip"]["model"], other_model)
    with pytest.raises(InputError, match="were started with"):
        score_image_folder(out_dir, ["clip"], batch_size=4, scorer_options={"clip": {"model": str(other_model)}}, device="cpu")


def test_bad_folders_are_reported(tmp_path, tiny_options):
    out_dir = make_folder(tmp_path / "folder", count=2)
    (out_dir / "images/p1/00001.png").unlink()
    with pytest.raises(InputError, match="row 3: image 'images/p1/00001.png' not found"):
        score_image_folder(out_dir, ["clip"], scorer_options={"clip": tiny_options["clip"]})
    pd.DataFrame({"image_path": ["images/p0/00000.png"]}).to_csv(out_dir / "manifest.csv", index=False)
    with pytest.raises(InputError, match="missing column\\(s\\) prompt"):
        score_image_folder(out_dir, ["clip"], scorer_options={"clip": tiny_options["clip"]})
    with pytest.raises(ValueError, match="options given for scorer\\(s\\) not run: aesthetic"):
        score_image_folder(out_dir, ["clip"], scorer_options=tiny_options)


def _score_images_script(repo_root):
    return importlib.import_module("popalign.score.__main__")


@pytest.mark.parametrize("arguments, message", [
    (["--scorers", "clip,hps"], "error: --scorers: unknown scorer(s) hps"),
    (["--option", "hspv2.version=v2.0"], "unknown scorer(s) hspv2"),
    (["--option", "hpsv2version=v2.0"], "expected SCORER.KEY=VALUE"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
])
def test_script_rejects_bad_flags_with_exit_code_2(tmp_path, repo_root, capsys, arguments, message):
    out_dir = make_folder(tmp_path / "folder", count=1)
    code = _score_images_script(repo_root).main(["--out_dir", str(out_dir), *arguments])
    assert code == 2 and message in capsys.readouterr().err


def test_script_reads_options_from_json_then_flags(tmp_path, repo_root):
    options_file = tmp_path / "options.json"
    options_file.write_text(json.dumps({"hpsv2": {"version": "v2.0", "checkpoint": "a.pt"}}), encoding="utf-8")
    options = _score_images_script(repo_root).parse_scorer_options(["hpsv2.checkpoint=b.pt", "clip.model=m"], str(options_file))
    assert options == {"hpsv2": {"version": "v2.0", "checkpoint": "b.pt"}, "clip": {"model": "m"}}


def test_two_processes_give_the_single_process_file(tmp_path, tiny_options, repo_root):
    single = make_folder(tmp_path / "single")
    sharded = make_folder(tmp_path / "sharded")
    score_image_folder(single, ["clip"], batch_size=2, scorer_options={"clip": tiny_options["clip"]}, device="cpu")
    options_file = tmp_path / "options.json"  # options of scorers not run are ignored
    options_file.write_text(json.dumps(tiny_options), encoding="utf-8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*torchrun, "-m", "popalign.score", "--out_dir", str(sharded), "--scorers", "clip",
         "--batch_size", "2", "--options_json", str(options_file)],
        capture_output=True, text=True, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("clip",):
        assert (sharded / f".quality_{name}.part0.jsonl").stat().st_size > 0
        assert (sharded / f".quality_{name}.part1.jsonl").stat().st_size > 0
        expected, got = read_scores(single, name), read_scores(sharded, name)
        assert list(got["image_path"]) == list(expected["image_path"])
        assert got["score"].tolist() == pytest.approx(expected["score"].tolist(), rel=1e-5, abs=1e-5)


def test_toy_scorer_runs_through_the_runner_without_device_options(tmp_path):
    out_dir = make_folder(tmp_path / "folder", count=3)
    score_image_folder(out_dir, ["toy"], batch_size=2)
    frame = read_scores(out_dir, "toy")
    assert len(frame) == 3 and frame["score"].between(0.0, 1.0).all() and set(frame["scorer"]) == {"toy"}
