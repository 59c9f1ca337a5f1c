"""Full U-Net fine-tuning with its weights, gradients and optimizer state sharded over the launched processes
(`--fsdp`: torch FSDP2, `fully_shard`), for a U-Net whose trained copy, gradients and AdamW moments do not fit on one
GPU beside the frozen reference.

Each ResnetBlock2D and each BasicTransformerBlock is one shard unit (its weights are gathered for its forward and
backward only), and the rest of the U-Net (convolutions in and out, time and class embeddings, up/down samplers) is
the root unit. The frozen reference U-Net is not sharded: it stays whole on every process in the training dtype (the
trainer loads it so), as the policy's all-gathers would otherwise double its traffic.

Numerics are those of plain data-parallel training: every process computes its micro-batch, gradients are averaged
over processes (reduce-scatter instead of DDP's all-reduce), autocast runs the forward in --mixed_precision, and the
optimizer steps each process's shard. Weights are gathered in fp32 (no bf16 all-gather policy).

A checkpoint holds the full weights in diffusers format (<checkpoint>/unet, what eval.sh and the best checkpoint read,
as in unsharded runs) and the full AdamW state as safetensors plus its hyperparameters as JSON: gathered on the main
process to write, read there and scattered to resume, so nothing in a checkpoint is unpickled (and, the tensors being
whole, another number of processes could resume it: not tested). The gathered state lives in the main process's CPU memory while it is written or read
(for SDXL: 10 GB of weights and 20 GB of AdamW moments).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from popalign.io import InputError, atomic_write_text, fresh_folder, refuse_symlink

OPTIMIZER_STATE_FILE = "optimizer_state.safetensors"  # {"<parameter name>/<state name>": tensor}
OPTIMIZER_GROUPS_FILE = "optimizer_param_groups.json"  # the optimizer's param_groups (hyperparameters, parameter names)


def shard_units(unet) -> list[torch.nn.Module]:
    """The U-Net's sub-modules that become their own shard units: every ResnetBlock2D and BasicTransformerBlock."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return [module for module in unet.modules() if isinstance(module, (ResnetBlock2D, BasicTransformerBlock))]


def shard_unet(unet, device: torch.device) -> dict:
    """Shard `unet` in place over every launched process (the default process group, which the launcher made); return
    {"units", "processes", "parameters" (the whole U-Net's), "local_parameters" (this process's shard)}."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    parameters = sum(parameter.numel() for parameter in unet.parameters())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(unet)  # fully_shard moves each unit to the device as it shards it: one whole unit there at a time
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    local = sum(parameter.to_local().numel() for parameter in unet.parameters())
    return {"units": len(units) + 1, "processes": dist.get_world_size(), "parameters": parameters, "local_parameters": local}


def is_sharded_checkpoint(checkpoint: str | Path) -> bool:
    """A checkpoint written by a --fsdp run (its optimizer state as OPTIMIZER_STATE_FILE)."""
    return (Path(checkpoint) / OPTIMIZER_STATE_FILE).is_file()


def check_checkpoint_layout(checkpoint: str | Path, fsdp: bool) -> None:
    """A sharded run resumes only a sharded run's checkpoint and an unsharded run only an unsharded one's (their optimizer
    states are stored differently); InputError naming --resume_from_checkpoint otherwise."""
    if fsdp and not is_sharded_checkpoint(checkpoint):
        raise InputError(f"--resume_from_checkpoint {checkpoint}: saved by a run without --fsdp; resume it without --fsdp")
    if not fsdp and is_sharded_checkpoint(checkpoint):
        raise InputError(f"--resume_from_checkpoint {checkpoint}: saved by a --fsdp run; resume it with --fsdp")


@dataclass
class ShardedUNet:
    """The sharded policy and its optimizer: what a sharded run gathers to save and scatters to resume. Every method
    is collective: all processes call it together."""

    unet: torch.nn.Module  # after shard_unet
    optimizer: torch.optim.Optimizer
    is_main_process: bool

    def full_weights(self) -> dict[str, torch.Tensor]:
        """The whole U-Net's weights on the CPU of the main process ({} on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_unet(self, folder: Path) -> None:
        """The whole U-Net in diffusers format at `folder` (written by the main process, fresh)."""
        weights = self.full_weights()
        on_main_process(self.is_main_process, lambda: write_unet(self.unet.config, weights, folder), f"writing {folder}")

    def save(self, checkpoint: Path) -> None:
        """Into a checkpoint folder: <checkpoint>/unet and the optimizer's state (OPTIMIZER_STATE_FILE, OPTIMIZER_GROUPS_FILE)."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights = self.full_weights()  # both gathers before any write: a write fault cannot leave a process waiting in one
        state = get_optimizer_state_dict(self.unet, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def write() -> None:
            write_unet(self.unet.config, weights, checkpoint / "unet")
            tensors = {f"{name}/{key}": value.contiguous() for name, values in state["state"].items() for key, value in values.items()}
            refuse_symlink(checkpoint / OPTIMIZER_STATE_FILE)
            save_file(tensors, str(checkpoint / OPTIMIZER_STATE_FILE))
            atomic_write_text(checkpoint / OPTIMIZER_GROUPS_FILE, json.dumps(state["param_groups"], indent=1) + "\n")

        on_main_process(self.is_main_process, write, f"writing {checkpoint}")

    def load(self, checkpoint: Path) -> None:
        """Restore the weights and the optimizer's state that `save` wrote (read by the main process, scattered)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        weights, state = on_main_process(self.is_main_process, lambda: read_full_state(checkpoint), f"reading {checkpoint}") or ({}, {})
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.unet, weights, options=options)
        set_optimizer_state_dict(self.unet, self.optimizer, state, options=options)


def on_main_process(is_main_process: bool, work, what: str):
    """`work()` on the main process, its result there (None elsewhere), and every process learns whether it failed before
    any goes on to the next collective call: the main process re-raises its error, the others raise one line naming it
    (a fault on the main process alone would otherwise leave the others waiting in the next gather or broadcast)."""
    import torch.distributed as dist

    result, failure, message = None, None, [None]
    if is_main_process:
        try:
            result = work()
        except Exception as error:  # noqa: BLE001 (every process must hear of any failure; it is re-raised below)
            failure, message = error, [(isinstance(error, InputError), (str(error).strip() or type(error).__name__).splitlines()[0])]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        input_error, line = message[0]
        raise (InputError if input_error else RuntimeError)(line if input_error else f"the main process failed {what} ({line})")
    return result


def write_unet(config, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """A plain UNet2DConditionModel of `config` holding the gathered `weights`, saved fresh in diffusers format at `folder`."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # no second copy of the weights: the gathered tensors are assigned
        model = UNet2DConditionModel.from_config(config)
    model.load_state_dict(weights, assign=True)
    with fresh_folder(folder) as partial:
        model.save_pretrained(str(partial))


def read_full_state(checkpoint: Path) -> tuple[dict, dict]:
    """(U-Net weights, optimizer state dict keyed by parameter name) of a sharded run's checkpoint, from safetensors and
    JSON only; InputError naming the file when one is missing or unreadable."""
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = UNet2DConditionModel.from_pretrained(str(checkpoint), subfolder="unet").state_dict()
        tensors = load_file(str(checkpoint / OPTIMIZER_STATE_FILE))
        groups = json.loads((checkpoint / OPTIMIZER_GROUPS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"--resume_from_checkpoint {checkpoint}: cannot read the sharded run's state ({first_line})") from None
    state: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, _, entry = key.rpartition("/")
        state.setdefault(name, {})[entry] = tensor
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return weights, {"state": state, "param_groups": groups}
