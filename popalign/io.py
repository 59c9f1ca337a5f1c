"""File helpers shared by every stage: checked CSV reading, atomic writes, the input error type."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd


class InputError(ValueError):
    """Bad user input. The message is one line naming the file and row (or flag) at fault."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv_checked(path: str | Path, required_columns: Sequence[str]) -> pd.DataFrame:
    """Read a CSV with every cell as a string (empty cells -> ""), checking the required columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable CSV file ({str(error).splitlines()[0]})") from None
    missing = [column for column in required_columns if column not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(frame.columns)})")
    return frame


def csv_row_number(index: int) -> int:
    """Line number in the file of the data row at 0-based position `index` (the header is line 1)."""
    return index + 2


def _default_file_mode() -> int:
    """0o666 less the umask: what open() would give (mkstemp makes files 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_name, _default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def remove_orphaned_temporary_files(folder: str | Path, patterns: tuple[str, ...] = (".*.tmp",)) -> int:
    """Delete the temporary files (`.<name>.<random>.tmp`) that atomic writes of a killed run left in `folder`; they
    never carry a final name. Call it from the one process that owns the folder, before any process of the run
    writes there. Returns how many were removed."""
    removed = 0
    for pattern in patterns:
        for orphan in Path(folder).glob(pattern):
            if orphan.is_file():
                orphan.unlink(missing_ok=True)
                removed += 1
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that `path` holds either the old content or all of the new."""
    _atomic_write(Path(path), lambda stream: stream.write(text))


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    _atomic_write(Path(path), lambda stream: frame.to_csv(stream, index=False, quoting=csv.QUOTE_MINIMAL))


def atomic_save_image(image, path: str | Path) -> None:
    """Save a PIL image as PNG through a temporary file, so no partial image ever has the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png.tmp")
    os.close(handle)
    try:
        image.save(tmp_name, format="PNG")
        os.chmod(tmp_name, _default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def read_jsonl(paths: Iterable[str | Path]) -> list[dict]:
    """Read JSON lines from several files, ignoring a truncated last line (a crash mid-write)."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the module docstring as written, and each flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    """The entry points' parser: --help shows the module docstring and every default (HelpFormatter), and a flag
    argparse rejects (unknown, missing, of the wrong type) is one line, `error: <what>`, and exit code 2, like every
    other input error, instead of the usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        main_module = sys.modules.get("__main__")
        package = getattr(main_module, "__spec__", None) and main_module.__spec__.name.removesuffix(".__main__")
        if package and main_module.__spec__.name.endswith(".__main__"):
            kwargs.setdefault("prog", f"python -m {package}")  # a stage package run with -m: not "__main__.py"
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def check_model_location(flag: str, value: str, hub_allowed: bool = True) -> None:
    """A model named by a path must exist; a hub id ('org/name') is left to the loader. Catches a local typo
    before anything is loaded or written, instead of a hub connection error."""
    if not value or Path(value).exists():
        return
    looks_local = (not hub_allowed or value.startswith(("/", "./", "../", "~")) or value.count("/") != 1
                   or value.endswith(("/", ".safetensors")))
    if looks_local:
        raise InputError(f"--{flag} {value}: no such file or folder")


def check_output_location(path: str | Path, flag: str, folder: bool = False) -> None:
    """Before any work: the output (a file, or with `folder` a folder) can be written at `path`: no file stands where
    one of its parent folders must be, and nothing of the other kind sits at its name. InputError naming the flag."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: a file is in the way (give a folder)")
    if not folder and path.is_dir():
        raise InputError(f"{flag} {path}: a folder is in the way (give a file name)")


def exit_2_on_input_error(main):
    """The entry points' one error path: `main(argv)` raising InputError prints `error: <message>` (one line, naming
    the file and row or the flag) on stderr and returns exit code 2; anything else is returned as it is."""
    import functools
    import sys

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return run
