"""Shared test setup: offline hub, one thread per process, tiny pipelines built once per session."""

import os

# Set before torch / huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    from popalign.tiny_models import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    from popalign.tiny_models import build_tiny_sd_pipeline

    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    """A random-weight transformers CLIPModel + CLIPProcessor (real CLIP BPE, 32x32 images)."""
    from popalign.tiny_models import build_tiny_clip_model

    return build_tiny_clip_model(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="session")
def small_run_world(tmp_path_factory) -> Path:
    """A small valid run of every stage on the toy base (tests/bad_input_world.py), built once per session and shared:
    copy it before changing anything in it."""
    from bad_input_world import build_world_apart

    return build_world_apart(tmp_path_factory.mktemp("small_run") / "world")


@pytest.fixture
def small_run_copy(small_run_world, tmp_path, monkeypatch) -> Path:
    """A copy of small_run_world as the working directory, with the toy environment set, to break and run stages in."""
    import shutil

    from bad_input_world import TOY_ENVIRONMENT, reset_accelerate

    copy = tmp_path / "world"
    shutil.copytree(small_run_world, copy, symlinks=True)
    monkeypatch.chdir(copy)
    for name, value in TOY_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    reset_accelerate()
    yield copy
    reset_accelerate()
