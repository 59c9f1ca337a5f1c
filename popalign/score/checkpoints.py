"""Finding and reading scorer weights: a local path, or a file of a model-hub repository."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from popalign.io import InputError


def existing_file(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return str(path)


def local_or_hub_file(path: str | None, hub_repo: str, hub_filename: str) -> str:
    """`path` when given (it must exist), else `hub_filename` of hub repo `hub_repo` (downloaded once, then cached)."""
    if path is not None:
        return existing_file(path)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=hub_repo, filename=hub_filename)


class InertObject:
    """Stands in for a Python object a checkpoint pickles beside its tensors; nothing of it runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_torch_checkpoint(path: str) -> dict:
    """torch.load on the CPU that never runs code from the file.

    torch's weights-only unpickler reads tensors and plain containers. Some published research
    checkpoints also pickle training arguments (argparse.Namespace and the like); each such class is
    replaced by `InertObject`, so its constructor and state are never called. Globals that torch
    blocks outright (os, subprocess, builtins' eval...) stay refused: the file is rejected.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type(name.rsplit(".", 1)[-1], (InertObject,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(f"{path}: refusing to load, the file would run code when unpickled "
                         f"({', '.join(names) or 'unsupported content'}); use a checkpoint of tensors only") from error
