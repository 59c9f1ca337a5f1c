"""The one place that knows how processes are launched: an Accelerator that sees all of them."""

from __future__ import annotations

import os


def global_rank() -> int:
    """This process's rank among all launched processes (the launcher's RANK; 0 when not launched), known before any
    Accelerator is made: for work done once per launch, by rank 0."""
    return int(os.environ.get("RANK", "0"))


def make_accelerator(**accelerator_options):
    """An Accelerator that shards over every launched process, with or without a GPU.

    Without CUDA, accelerate forms a multi-process (gloo) group only when told to run on the CPU;
    `accelerate launch --multi_gpu` on a GPU-less machine and `torchrun` do not say so, and every
    process would then believe it is the only one (and do all the work). Raises if the process
    count accelerate sees differs from the launcher's WORLD_SIZE.
    """
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **accelerator_options)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}")
    return accelerator
