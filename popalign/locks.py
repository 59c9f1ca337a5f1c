"""One run at a time per output: a lock file that the operating system releases when its process ends.

    with output_lock(out_dir, "generation"):
        ...  # write into out_dir

takes `<out_dir>/.generation.lock` with fcntl.flock (exclusive, non-blocking) and writes into it who holds it (pid,
host, start time, command line). A second run on the same output stops at once with an InputError naming the holder.
The lock belongs to the open file, not to the file's existence: a process killed with SIGKILL releases it (the file
stays, naming the run that last held it), so nothing needs cleaning up before the next run.

Under a multi-process launch only the process that owns the folder's shared files (the global main process) takes
the lock; the others write only their own part files, and the launcher ends them if the main process stops.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from popalign.io import InputError, refuse_symlink, write_fault_error


def lock_path(folder: str | Path, name: str) -> Path:
    """Where the lock `name` of `folder` lives: `<folder>/.<name>.lock`."""
    return Path(folder) / f".{name}.lock"


def _holder_description(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{' '.join(holder['command'])}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"


def _open_lock_file(path: Path) -> int:
    refuse_symlink(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            refuse_symlink(path)
        fault = write_fault_error(path, error)
        if fault is not None:
            raise fault from None
        raise


def _same_file(handle: int, path: Path) -> bool:
    """The locked descriptor is still the file at `path` (the run before may have removed it as it ended)."""
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def output_lock(folder: str | Path, name: str, take: bool = True) -> Iterator[Path | None]:
    """Hold `<folder>/.<name>.lock` for the block (the folder is made if missing); the file is removed as the block
    ends. InputError at once when another process holds it, naming that process. `take=False` (a process other than
    the folder's owner under a multi-process launch) holds nothing."""
    if not take:
        yield None
        return
    path = lock_path(folder, name)
    while True:
        handle = _open_lock_file(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_description(path)
            os.close(handle)
            raise InputError(f"{folder}: another run is writing here ({holder}; lock file {path}); wait for it to end "
                             "or use another output location") from None
        if _same_file(handle, path):
            break
        os.close(handle)  # locked a file the run before removed as it ended: take the new one
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": [sys.executable, *sys.argv]}
        try:
            os.ftruncate(handle, 0)
            os.pwrite(handle, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        except OSError:  # a full disk: the lock holds all the same, and the stage's own write names the fault
            pass
        yield path
    finally:
        try:
            os.unlink(path)  # while still held: a run waiting on this file sees it gone and opens a new one
        except OSError:
            pass
        os.close(handle)  # releases the lock


def check_not_locked(folder: str | Path, name: str) -> None:
    """For a check before a launch (--validate_only): InputError naming the holder when a run holds `<folder>/.<name>.lock`
    now. Takes nothing and creates nothing (a lock file that a run left is opened and closed unchanged)."""
    path = lock_path(folder, name)
    if path.is_symlink() or not path.is_file():
        return
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{folder}: another run is writing here ({_holder_description(path)}; lock file {path}); wait for it to end "
                         "or use another output location") from None
    finally:
        os.close(handle)
