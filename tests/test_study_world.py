"""A small world for the human-study tests: eval.sh-shaped image folders of two or three models, and a real server
started as `python -m popalign.study serve` in its own process (no torch anywhere)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from PIL import Image, PngImagePlugin

from popalign.image_folder import MANIFEST_COLUMNS, read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
# The prompt carries markup: a page that parsed it as HTML would show bold text instead of these characters.
MARKUP_PROMPT = "a photo of a <b>doctor</b> & <script>alert(1)</script> {index}"


def make_image_folders(root: Path, models=("base", "popalign"), neutral_prompts: int = 3, images_per_neutral: int = 9,
                       identity_prompts: int = 3, images_per_identity: int = 2) -> dict[str, Path]:
    """One folder per model with manifest.csv and 32x32 PNGs (each carrying its model's name in a text chunk, as a
    careless generator might); the same prompt ids, image indices and seeds in every folder."""
    folders = {}
    for model_index, model in enumerate(models):
        folder = root / model
        rows = []
        prompts = [("neutral", images_per_neutral)] * neutral_prompts + [("identity", images_per_identity)] * identity_prompts
        for prompt_number, (kind, count) in enumerate(prompts):
            for image_index in range(count):
                relative = f"images/p{prompt_number:03d}/{image_index}.png"
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng(1000 * prompt_number + image_index)
                pixels = np.full((32, 32, 3), 60 + 70 * model_index, np.uint8)
                pixels[8:24, 8:24] = rng.integers(0, 256, 3)
                info = PngImagePlugin.PngInfo()
                info.add_text("model", model)
                Image.fromarray(pixels).save(folder / relative, pnginfo=info)
                row = dict.fromkeys(MANIFEST_COLUMNS, "")
                row.update(image_path=relative, prompt_id=f"p{prompt_number:03d}", kind=kind,
                           prompt=MARKUP_PROMPT.format(index=prompt_number), neutral_prompt="a photo of a doctor",
                           image_index=image_index, seed=str(10_000 * prompt_number + image_index), model=model)
                rows.append(row)
        pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)
        folders[model] = folder
    return folders


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StudyServer:
    """`python -m popalign.study serve` on 127.0.0.1 in a child process; start() waits until it answers."""

    def __init__(self, study_dir: Path, port: int | None = None):
        self.study_dir, self.port = Path(study_dir), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "StudyServer":
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "popalign.study", "serve", "--study", str(self.study_dir), "--port", str(self.port)],
            cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server stopped: {self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the server did not answer within 30 s")

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=20)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def admin_token(study_dir: Path) -> str:
    return (Path(study_dir) / "private" / "admin_token").read_text().strip()


def test_world_folders_are_eval_folders(tmp_path):
    folders = make_image_folders(tmp_path)
    manifests = [read_manifest(folder, ("prompt_id", "seed")) for folder in folders.values()]
    assert list(manifests[0]["seed"]) == list(manifests[1]["seed"])
