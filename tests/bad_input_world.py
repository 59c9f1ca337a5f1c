"""The bad-input suite's world: a small valid run of every stage (popalign.toy.small_run), built once per test session in
this process. Each case copies it, breaks one thing, runs the stage's entry point in the copy and checks that nothing
written before changed. Every path is relative to the world's folder (the working directory of each run), so a copy
is a world of its own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from popalign.toy.small_run import REPO_ROOT, TOY_ENVIRONMENT, TOY_MODEL, stage_arguments, write_inputs

__all__ = ["REPO_ROOT", "TOY_ENVIRONMENT", "TOY_MODEL", "build_world", "build_world_apart", "reset_accelerate", "root_script", "snapshot", "stage_arguments", "stage_mains"]


def root_script(name: str):
    """A numbered script at the repository root, imported as a module (its name starts with a digit)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("-", "_"), REPO_ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (relative path -> bytes): equal before and after a refused run when nothing changed."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def reset_accelerate() -> None:
    """Each in-process run builds its own Accelerator; accelerate's process-wide state must not leak between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def stage_mains() -> dict:
    """Each stage's entry point: main(argv) -> exit code."""
    import popalign.classify.__main__ as classify
    import popalign.evaluate.__main__ as evaluate
    import popalign.generate.__main__ as generate
    import popalign.score.__main__ as score
    import popalign.toy.report as report

    return {"prompts": root_script("1_generate_diverse_prompts.py").main, "generate": generate.main,
            "classify": classify.main, "score": score.main, "pairs": root_script("3_generate_preferences.py").main,
            "train": root_script("train_popalign.py").main, "evaluate": evaluate.main, "report": report.main}


def build_world(world: Path, **sizes) -> Path:
    """Run every stage once, in this process (changes the working directory to `world` and sets the toy environment);
    `sizes` go to stage_arguments (max_train_steps, checkpointing_steps, ...)."""
    write_inputs(world)
    os.chdir(world)
    os.environ.update(TOY_ENVIRONMENT)
    arguments, mains = stage_arguments(**sizes), stage_mains()
    for stage in ("prompts", "generate", "classify", "score", "pairs", "train"):
        reset_accelerate()
        code = mains[stage](arguments[stage])
        assert code in (0, None), f"the valid {stage} run failed with exit code {code}"
    shutil.copytree("images/train", "images/tuned")
    reset_accelerate()
    assert mains["evaluate"](arguments["evaluate"]) == 0
    return world


def build_world_apart(world: Path, **sizes) -> Path:
    """build_world, leaving this process's working directory, environment and accelerate state as they were."""
    cwd, saved = os.getcwd(), {name: os.environ.get(name) for name in TOY_ENVIRONMENT}
    try:
        return build_world(world, **sizes)
    finally:
        os.chdir(cwd)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_accelerate()
