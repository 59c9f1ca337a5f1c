"""The generation speed options reach popalign.generate from 2_generate_images.sh and eval.sh: each script is run by
bash with `accelerate` and `python` recording their command lines (step 1's prompt script runs for real, since eval.sh
reads its output), and every recorded generation command is read by popalign.generate's own parser."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Shell variable -> the field of popalign.generate's parsed flags it must set.
SPEED_VARIABLES = {"CHANNELS_LAST": "channels_last", "VAE_SLICING": "vae_slicing", "VAE_TILING": "vae_tiling",
                   "COMPILE_UNET": "compile_unet"}
RECORDER = """#!/bin/sh
# Records this command line (one line, shell-quoted) and succeeds; step 1's prompt script runs for real.
if [ "$1" = 1_generate_diverse_prompts.py ]; then exec "{python}" "$@"; fi
{{ printf '%s' "$(basename "$0")"; for argument in "$@"; do printf ' %s' "'$(printf '%s' "$argument" | sed "s/'/'\\\\\\\\''/g")'"; done; echo; }} >> "{log}"
"""


def run_script(script: str, tmp_path: Path, **variables) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "commands.log"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    for name in ("python", "accelerate"):
        (bin_dir / name).write_text(RECORDER.format(python=sys.executable, log=log))
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT_DIR": str(tmp_path / "out"), **variables}
    completed = subprocess.run(["bash", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    return completed, [shlex.split(line) for line in log.read_text().splitlines()]


def generation_flags(commands: list[list[str]]):
    """popalign.generate's parsed flags of every recorded generation command (checks and launches)."""
    from popalign.generate.__main__ import build_parser

    parsed = []
    for command in commands:
        if "popalign.generate" in command:
            arguments = command[command.index("popalign.generate") + 1:]
            parsed.append(build_parser().parse_args(arguments))
    return parsed


@pytest.mark.parametrize("script", ["2_generate_images.sh", "eval.sh"])
def test_every_speed_variable_reaches_its_flag_and_each_is_off_by_default(script, tmp_path):
    completed, commands = run_script(script, tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    default_runs = generation_flags(commands)
    assert len(default_runs) >= 2  # the check and the launch (eval.sh: every model's)
    for flags in default_runs:
        assert not any(getattr(flags, field) for field in SPEED_VARIABLES.values())
    for variable, field in SPEED_VARIABLES.items():
        completed, commands = run_script(script, tmp_path, **{variable: "on"})
        assert completed.returncode == 0, completed.stderr[-2000:]
        runs = generation_flags(commands)
        assert len(runs) == len(default_runs)
        for flags in runs:  # this option on, every other still off
            assert {name: getattr(flags, name) for name in SPEED_VARIABLES.values()} == \
                {name: name == field for name in SPEED_VARIABLES.values()}, variable


@pytest.mark.parametrize("script", ["2_generate_images.sh", "eval.sh"])
def test_a_speed_variable_that_is_neither_on_nor_off_stops_before_any_command(script, tmp_path):
    completed, commands = run_script(script, tmp_path, VAE_TILING="yes")
    assert completed.returncode == 2
    assert "VAE_TILING=yes: expected on or off" in completed.stderr
    assert not [command for command in commands if "popalign.generate" in command]


@pytest.mark.parametrize("script", ["2_generate_images.sh", "eval.sh"])
def test_generation_vae_reaches_every_generation_and_the_training_vae_does_not(script, tmp_path):
    """GENERATION_VAE is the decoding VAE of every generation (eval.sh: every model's, so images pair up); VAE, 4_train.sh's
    encoding VAE that RECIPE files also set, leaves generation with the model's own VAE."""
    for variables, expected in (({"VAE": "madebyollin/sdxl-vae-fp16-fix"}, ""),
                                ({"GENERATION_VAE": "models/decoder vae", "VAE": ""}, "models/decoder vae")):
        completed, commands = run_script(script, tmp_path, **variables)
        assert completed.returncode == 0, completed.stderr[-2000:]
        runs = generation_flags(commands)
        assert len(runs) >= 2 and [flags.vae for flags in runs] == [expected] * len(runs), variables


def test_an_empty_scorers_variable_turns_quality_scoring_off(tmp_path):
    # eval.sh's default scores every image; SCORERS= (set and empty) runs no scorer, also under the toy recipe
    for variables, scored in (({}, True), ({"SCORERS": ""}, False), ({"RECIPE": "configs/toy_recipe.sh", "SCORERS": ""}, False)):
        completed, commands = run_script("eval.sh", tmp_path, **variables)
        assert completed.returncode == 0, completed.stderr[-2000:]
        assert any("popalign.score" in command for command in commands) == scored, variables
        assert any("popalign.generate" in command for command in commands)
