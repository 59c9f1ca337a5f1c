"""File helpers shared by every stage: checked CSV reading, atomic writes that never follow a link, the input error
type and the entry points' one error path (a full disk, missing rights and an interrupt are one line too), the seed
type of every seed flag, output and model location checks."""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import hashlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd


class InputError(ValueError):
    """Bad user input. The message is one line naming the file and row (or flag) at fault."""


# What a full disk, a file-size limit, a read-only mount or missing rights give at a write: the user's to fix, so
# one line naming the file (OSError's other causes keep their traceback).
WRITE_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for the file system",
                errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def write_fault_error(path: str | Path, error: OSError) -> "InputError | None":
    """The one-line InputError for a write to `path` that failed with a full disk or missing rights; None otherwise."""
    if isinstance(error, PermissionError) or error.errno in WRITE_FAULTS:
        reason = WRITE_FAULTS.get(error.errno, "permission denied")
        return InputError(f"{path}: cannot write ({reason}); the files written before are kept: free space or fix the "
                          "rights, then run the same command again")
    return None


@contextlib.contextmanager
def write_faults_named(path: str | Path):
    """Around a write to `path` by this code or a library: a full disk, a file-size limit or missing rights become the
    one-line InputError naming `path` (write_fault_error). Libraries that report the operating system's error inside
    their own exception type are read too: safetensors' "(os error 28)", torch's serializer's failures."""
    import re

    try:
        yield
    except InputError:
        raise
    except OSError as error:
        fault = write_fault_error(path, error)
        if fault is not None:
            raise fault from None
        raise
    except Exception as error:
        text = str(error)
        code = re.search(r"\(os error (\d+)\)|\bcode: (\d+)", text)
        number = int(code.group(1) or code.group(2)) if code else None
        if number in WRITE_FAULTS:
            raise write_fault_error(path, OSError(number, os.strerror(number))) from None
        if "file write failed" in text or "inline_container" in text:  # torch's serializer keeps no errno; the disk is the likely cause
            raise InputError(f"{path}: cannot write (the write failed: {text.strip().splitlines()[0]}; is the disk full?); the files "
                             "written before are kept: free space, then run the same command again") from None
        raise


def refuse_symlink(path: str | Path) -> None:
    """A stage writes its own files fresh in its folders; a symbolic link where one belongs would send the write
    elsewhere (outside the run), so it is an error naming it."""
    if os.path.islink(path):
        raise InputError(f"{path}: is a symbolic link (to {os.readlink(path)}); a stage writes its own files and does not "
                         "follow links: remove the link and run again")


def open_for_append(path: str | Path):
    """A text stream appending to `path`, created if missing, never through a symbolic link (O_NOFOLLOW): an
    append-only log or part file of a stage. InputError naming a link, or a full disk / missing rights."""
    path = Path(path)
    refuse_symlink(path)
    try:
        handle = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            refuse_symlink(path)  # linked between the check and the open
        fault = write_fault_error(path, error)
        if fault is not None:
            raise fault from None
        raise
    return os.fdopen(handle, "a+", encoding="utf-8")


def clear_for_writer(path: str | Path) -> Path:
    """Before a library that opens a file by name for writing (safetensors, torch, PIL) writes `path` of a stage's
    folder: a link there is refused (InputError naming it) and an old file removed, so the write creates a fresh file
    instead of writing through whatever stood there."""
    path = Path(path)
    refuse_symlink(path)
    if path.is_file():
        path.unlink()
    return path


@contextlib.contextmanager
def fresh_folder(path: str | Path):
    """Write a folder through a library's save_pretrained / save_state: yields `<path>.partial`, made new (an
    earlier one, which a killed run left and anyone could have planted links in, is removed first); when the block ends
    without error it replaces `path`. Links at either name are refused (InputError naming them)."""
    import shutil

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    for candidate in (path, partial):
        refuse_symlink(candidate)
    if partial.exists():
        shutil.rmtree(partial)
    yield partial
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


def parse_seed(text: str) -> int:
    """argparse type of every seed flag: an integer in [0, 2**32), the range numpy's and torch's seeding accept
    everywhere (a seed outside it fails only once the run is under way)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: expected an integer in [0, 2**32)") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: expected 0 <= seed < 2**32 (4294967296)")
    return value


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv_checked(path: str | Path, required_columns: Sequence[str]) -> pd.DataFrame:
    """Read a CSV with every cell as a string (empty cells -> ""), checking the required columns. A byte-order mark
    (as spreadsheet programs save UTF-8) is not part of the first column's name."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
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
    with _temporary_beside(path, "") as temporary:
        with os.fdopen(temporary.take_handle(), "w", encoding="utf-8", newline="") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary.name, _default_file_mode())
        os.replace(temporary.name, path)


class _temporary_beside:
    """A fresh temporary file (`.<name>.<random><suffix>.tmp`, made by mkstemp: O_EXCL, never an existing file or a
    link) in `path`'s folder, removed if the block fails. A symbolic link at `path` is refused first (os.replace would
    replace the link, but the link means someone expects the write to land elsewhere); a full disk or missing rights
    is one InputError naming `path`, and the file under the final name stays as it was."""

    def __init__(self, path: Path, suffix: str):
        self.path, self.suffix, self.name, self.handle = Path(path), suffix, None, None

    def take_handle(self) -> int:
        """The open descriptor of the temporary file (the caller closes it): written through it, never reopened by name."""
        handle, self.handle = self.handle, None
        return handle

    def __enter__(self) -> "_temporary_beside":
        refuse_symlink(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle, self.name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=f"{self.suffix}.tmp")
        except OSError as error:
            fault = write_fault_error(self.path, error)
            if fault is not None:
                raise fault from None
            raise
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if self.handle is not None:
            os.close(self.handle)
        if error is None:
            return False
        if self.name is not None and os.path.lexists(self.name):
            os.unlink(self.name)
        if isinstance(error, OSError):
            fault = write_fault_error(self.path, error)
            if fault is not None:
                raise fault from None
        return False


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


def atomic_write_texts(texts: dict) -> None:
    """Write several files ({path: text}) as one unit as far as a file system allows: every temporary file is written
    and synced before the first is renamed into place, so a failure while writing (a full disk) leaves all of them as
    they were; the renames follow one another in the order given."""
    with contextlib.ExitStack() as stack:
        temporaries = []
        for path, text in texts.items():
            temporary = stack.enter_context(_temporary_beside(Path(path), ""))
            with os.fdopen(temporary.take_handle(), "w", encoding="utf-8", newline="") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary.name, _default_file_mode())
            temporaries.append((temporary.name, path))
        for name, path in temporaries:
            os.replace(name, path)


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    _atomic_write(Path(path), lambda stream: frame.to_csv(stream, index=False, quoting=csv.QUOTE_MINIMAL))


def _atomic_write_png(path: Path, write) -> None:
    with _temporary_beside(path, ".png") as temporary:
        with os.fdopen(temporary.take_handle(), "wb") as stream:
            write(stream)
            stream.flush()
        os.chmod(temporary.name, _default_file_mode())
        os.replace(temporary.name, path)


def atomic_save_image(image, path: str | Path) -> None:
    """Save a PIL image as PNG through a temporary file, so no partial image ever has the final name."""
    _atomic_write_png(Path(path), lambda stream: image.save(stream, format="PNG"))


def atomic_save_figure(figure, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG as atomic_save_image saves an image (a link at `path` refused, a full disk one
    line naming it)."""
    _atomic_write_png(Path(path), lambda stream: figure.savefig(stream, format="png", dpi=dpi))


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
    """A model named by a path must exist; a hub id ('org/name') is left to the loader once the hub is known to be
    reachable or the model cached (check_hub_reachable). Catches a local typo before anything is loaded or written,
    instead of a hub connection error."""
    if not value or Path(value).exists():
        return
    looks_local = (not hub_allowed or value.startswith(("/", "./", "../", "~")) or value.count("/") != 1
                   or value.endswith(("/", ".safetensors")))
    if looks_local:
        raise InputError(f"--{flag} {value}: no such file or folder")
    check_hub_reachable(flag, value)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set to a true value: nothing may be fetched."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def check_hub_reachable(flag: str, repo_id: str, timeout_s: float = 5.0) -> None:
    """A hub id that is not in the local cache needs the hub: when HF_HUB_OFFLINE is unset, try to connect once (a
    few seconds at most) and, if nothing answers, say so in one line instead of the loader's retries and traceback.
    With HF_HUB_OFFLINE set, or the model cached, the loader decides."""
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"))
    if hub_offline() or proxied or _in_hub_cache(repo_id):  # behind a proxy a direct connection says nothing
        return
    problem = _hub_connection_problem(timeout_s)
    if problem:
        raise InputError(f"--{flag} {repo_id}: not a local folder, not in the Hugging Face cache, and the hub cannot be "
                         f"reached ({problem}); download it on a machine with network (huggingface-cli download "
                         f"{repo_id}) or give a local folder")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return False
    return (Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


_HUB_PROBES: dict[str, str] = {}


def _hub_connection_problem(timeout_s: float) -> str:
    """'' when a TCP connection to the hub's endpoint (HF_ENDPOINT, default https://huggingface.co) opens within
    `timeout_s`, else what failed. Asked once per process."""
    import socket
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    if endpoint not in _HUB_PROBES:
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
            _HUB_PROBES[endpoint] = ""
        except OSError as error:
            _HUB_PROBES[endpoint] = f"{endpoint}: {error.strerror or error or type(error).__name__}"
    return _HUB_PROBES[endpoint]


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
    if not folder:
        refuse_symlink(path)
    # The folder that will receive the output (or the nearest one that exists, where it will be made) must be writable
    # now, not once the work is done.
    existing = next((candidate for candidate in ([path] if folder else []) + list(path.parents) if candidate.is_dir()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_mount(existing) else "permission denied"
        raise InputError(f"{flag} {path}: {existing} is not writable ({reason})")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _raise_terminated(signum, frame):
    raise Terminated()


INTERRUPTED_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number


def exit_2_on_input_error(main):
    """The entry points' one error path: `main(argv)` raising InputError prints `error: <message>` (one line, naming
    the file and row or the flag) on stderr and returns exit code 2. Ctrl-C (SIGINT) and SIGTERM end the run with one
    line saying that the finished work is kept and the same command resumes it (exit code 130 / 143; under a launcher
    only rank 0 says it). Anything else is returned as it is."""
    import functools

    @functools.wraps(main)
    def run(argv=None):
        handler_installed = False
        if _can_take_sigterm():
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
            handler_installed = True
        try:
            return main(argv)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            name = "SIGTERM" if isinstance(stop, Terminated) else "SIGINT"
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: interrupted ({name}); what was finished is kept: run the same command again to resume",
                      file=sys.stderr, flush=True)
            return INTERRUPTED_EXIT_CODES[name]
        finally:
            if handler_installed:
                signal.signal(signal.SIGTERM, previous)

    return run


def _can_take_sigterm() -> bool:
    """Only the main thread can set handlers, and only the default one is replaced (a launcher's or a test's stays)."""
    import threading

    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
