"""One home per default: the values a shell script writes at its top equal the Python defaults of the flags
it passes them to, and every script's --help exits 0 and shows the defaults."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from popalign.recipe import shell_defaults

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = ["2_generate_images.sh", "4_train.sh", "eval.sh"]
# The entry points: the numbered scripts and the trainer at the root, the other stages as `python -m popalign.<stage>`.
ENTRY_POINTS = ["1_generate_diverse_prompts.py", "popalign.generate", "popalign.classify", "popalign.score",
                "3_generate_preferences.py", "train_popalign.py", "popalign.evaluate", "popalign.evaluate.precision"]
# Where a stage reads and writes is the pipeline's wiring (each stage its own folder), not a default to agree on.
LOCATION_FLAGS = {"input", "output", "pairs_file", "output_dir", "out_dir", "prompts_csv", "report_dir"}
# A shell variable whose empty default means "not at all" where the flag it feeds has a default of its own: eval.sh
# runs the second classifier only when SECOND_CLASSIFIER is set.
OFF_WHEN_EMPTY = {("popalign.classify", "classifier", "SECOND_CLASSIFIER")}
FLAG_FROM_VARIABLE = re.compile(r'--(?P<flag>\w+) "\$(?:\{)?(?P<name>\w+)(?:\})?"')


def invocations(text: str) -> list[tuple[str, dict[str, str]]]:
    """Each command line that runs a repository script, as (script, {flag: variable})."""
    joined = re.sub(r"\\\n", " ", text)
    # Arrays of flags (`name=( ... )`, used as "${name[@]}") are expanded where they are used.
    arrays = {match["name"]: " ".join(match["body"].split()) for match in re.finditer(r"^\s*(?P<name>\w+)=\((?P<body>[^)]*)\)", joined, re.M | re.S)}
    for name, body in arrays.items():
        joined = joined.replace(f'"${{{name}[@]}}"', body)
    found = []
    for line in joined.splitlines():
        for script in re.findall(r"(?:^|\s)(\w+\.py|-m popalign(?:\.\w+)+)\b", line):
            script = script.removeprefix("-m ")
            if script in ENTRY_POINTS or (REPO_ROOT / script).is_file():
                found.append((script, {match["flag"]: match["name"] for match in FLAG_FROM_VARIABLE.finditer(line)}))
    return found


def parser_of(script: str):
    """The argparse parser of a root script (`name.py`) or of a module entry point (`popalign.<stage>`)."""
    if script == "train_popalign.py":
        from popalign.training.config import build_parser

        return build_parser()
    if script.startswith("popalign."):
        package = importlib.util.find_spec(script).submodule_search_locations is not None  # a stage package: its __main__
        return importlib.import_module(f"{script}.__main__" if package else script).build_parser()
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py").replace("-", "_"), REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def as_python(shell_value: str, python_default):
    """The shell's text as the flag's type would read it."""
    if isinstance(python_default, bool):
        return shell_value.lower() in ("1", "on", "true", "yes")
    if isinstance(python_default, (int, float)):
        return type(python_default)(float(shell_value))
    if shell_value and (REPO_ROOT / shell_value).exists() and Path(python_default).is_absolute():
        return str((REPO_ROOT / shell_value).resolve())  # a repository file, named relative to the root
    return shell_value


@pytest.mark.parametrize("shell_script", SHELL_SCRIPTS)
def test_shell_defaults_equal_the_python_defaults(shell_script):
    text = (REPO_ROOT / shell_script).read_text(encoding="utf-8")
    defaults = shell_defaults(text)
    checked, disagreements = 0, []
    for script, flags in invocations(text):
        parser_defaults = {option.lstrip("-"): action.default for action in parser_of(script)._actions for option in action.option_strings}
        for flag, variable in flags.items():
            if variable not in defaults or flag in LOCATION_FLAGS or flag not in parser_defaults or parser_defaults[flag] is None:
                continue
            if (script, flag, variable) in OFF_WHEN_EMPTY and defaults[variable] == "":
                continue
            checked += 1
            python_default = parser_defaults[flag]
            if as_python(defaults[variable], python_default) != python_default:
                disagreements.append(f"{shell_script} {variable}={defaults[variable]!r} but {script} --{flag} defaults to {python_default!r}")
    assert not disagreements, "\n".join(disagreements)
    assert checked >= 5, f"{shell_script}: only {checked} defaults compared; is the parsing still right?"


def test_the_parser_reads_a_disagreement():
    text = ': "${STEPS:=30}"\n: "${OTHER:=$STEPS}"\naccelerate launch -m popalign.generate --steps "$STEPS" \\\n  --seed "$SEED"\n'
    assert shell_defaults(text) == {"STEPS": "30"}
    assert invocations(text) == [("popalign.generate", {"steps": "STEPS", "seed": "SEED"})]
    assert as_python("30", parser_of("popalign.generate").get_default("steps")) != parser_of("popalign.generate").get_default("steps")


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_script_help_exits_0_and_shows_defaults(script):
    command = [sys.executable, "-m", script] if script.startswith("popalign.") else [sys.executable, script]
    completed = subprocess.run([*command, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "(default:" in completed.stdout
