"""The one place that knows how processes are launched: an Accelerator that sees all of them."""

from __future__ import annotations

import atexit
import os


def global_rank() -> int:
    """This process's rank among all launched processes (the launcher's RANK; 0 when not launched), known before any
    Accelerator is made: for work done once per launch, by rank 0."""
    return int(os.environ.get("RANK", "0"))


def launched_processes() -> int:
    """How many processes the launcher started (its WORLD_SIZE; 1 when not launched), known before any Accelerator is made."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(**accelerator_options):
    """An Accelerator that shards over every launched process, with or without a GPU.

    Without CUDA, accelerate forms a multi-process (gloo) group only when told to run on the CPU;
    `accelerate launch --multi_gpu` on a GPU-less machine and `torchrun` do not say so, and every
    process would then believe it is the only one (and do all the work). Raises if the process
    count accelerate sees differs from the launcher's WORLD_SIZE. A model it wraps in DDP keeps its gradients in
    DDP's all-reduce buckets (with_gradient_bucket_views).
    """
    import torch
    from accelerate import Accelerator

    accelerator_options["kwargs_handlers"] = with_gradient_bucket_views(accelerator_options.get("kwargs_handlers") or [])
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **accelerator_options)
    release_process_group_at_exit()
    launched = launched_processes()
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}")
    check_distributed_type(accelerator)
    return accelerator


def release_process_group_at_exit() -> None:
    """Destroy a gloo process group at interpreter exit (after the program ends or raises), while Python is still whole
    (once per process; a no-op without one). Left to interpreter finalization, gloo's worker threads can still hold
    tensors of finished collectives whose release needs the interpreter, and the process aborts ("terminate called
    without an active exception", SIGABRT) after its work is done, so the launcher reports a failed run. Only gloo:
    NCCL's teardown may wait on its communicators and belongs to the code that knows they are idle (the trainer's
    end_training)."""
    atexit.unregister(release_gloo_process_group)  # registered once, however many Accelerators are made
    atexit.register(release_gloo_process_group)


def release_gloo_process_group() -> None:
    """Destroy the default process group if one is up and its backend is gloo, then collect garbage, so that what
    still refers to the group (a DDP wrapper in a reference cycle) goes now rather than during finalization. Gloo's
    teardown sends nothing to the other processes: one that left early or raised cannot make this wait."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
        gc.collect()


# The launcher's request (accelerate launch sets these from its config) -> the distributed type that fulfils it.
REQUESTED_DISTRIBUTED_TYPES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def check_distributed_type(accelerator) -> None:
    """Refuse to go on when the launcher asked for FSDP or DeepSpeed and accelerate runs something else: on a
    machine without a GPU, an FSDP config can start as plain multi-process data parallel (every process holds the
    whole model) or as one process, without a word."""
    for variable, wanted in REQUESTED_DISTRIBUTED_TYPES.items():
        if os.environ.get(variable, "").lower() == "true" and accelerator.distributed_type.name != wanted:
            raise RuntimeError(f"the launcher asked for {wanted} ({variable}=true) but accelerate runs "
                               f"{accelerator.distributed_type.name}: refusing to train undistributed; use a GPU machine "
                               "for this config, or launch without it")


def with_gradient_bucket_views(handlers: list) -> list:
    """`handlers` (accelerate kwargs handlers) with DDP's gradient_as_bucket_view on: each gradient is then a view into
    the all-reduce bucket that carries it, instead of a second copy beside the bucket. That copy is the size of every
    trained gradient: 2.57 B fp32 numbers, 10.3 GB per process, for SDXL's U-Net trained in full. A
    DistributedDataParallelKwargs among the handlers is copied with the setting on (its other settings kept); without
    one, one is added. Only a model wrapped in DDP reads it (training under plain data-parallel)."""
    import dataclasses

    from accelerate.utils import DistributedDataParallelKwargs

    ddp = [handler for handler in handlers if isinstance(handler, DistributedDataParallelKwargs)]
    others = [handler for handler in handlers if not isinstance(handler, DistributedDataParallelKwargs)]
    base = ddp[0] if ddp else DistributedDataParallelKwargs()
    return [*others, dataclasses.replace(base, gradient_as_bucket_view=True)]
