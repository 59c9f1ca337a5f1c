"""The table of training objectives: the one place that knows what each `--loss` name means.

An entry says everything the rest of the package asks about an objective:

    loss            the loss on per-sample errors laid out by `layout` (a function of popalign.losses)
    layout          which samples the U-Net denoises for a batch of B pairs, all under the pair's caption:
                    winners (B), winners then losers (2B), winners then other winners of the batch (2B)
    uses_reference  whether it compares with the frozen reference U-Net (one more forward per sample)
    reads_losers    whether it reads the pairs file's loser images
    config_fields   the TrainConfig fields its loss reads (passed to it by name, nothing else)
    check           extra flag checks (InputError), beyond the types and ranges TrainConfig checks itself
    description     its line in the model card

The trainer, TrainConfig's validation, the model card and the cost model read this table; none of them
compares objective names. Adding an objective: its loss in popalign/losses.py, one `register_objective`
call (here for the shipped ones), and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from popalign.io import InputError
from popalign.losses import derangement, diffusion_dpo_loss, popalign_loss, sft_loss, sudo_loss

if TYPE_CHECKING:
    from popalign.training.encodings import TrainingBatch

# A layout: the latents the U-Net denoises for a batch of B pairs, (N, C, h, w) with N = B or 2B, and their SDXL time
# ids (N, 6) or None; every sample is denoised under its pair's caption, noise and timestep (repeated N / B times).
Layout = Callable[["TrainingBatch", torch.Generator], tuple[torch.Tensor, Optional[torch.Tensor]]]


def _cat(first: Optional[torch.Tensor], second: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if first is None else torch.cat([first, second])


def winners_only(batch: "TrainingBatch", generator: torch.Generator):
    """The B winners."""
    return batch.winner_latents, batch.winner_time_ids


def winners_then_losers(batch: "TrainingBatch", generator: torch.Generator):
    """[winners; losers] (2B): the pairs as the pairs file gives them."""
    return torch.cat([batch.winner_latents, batch.loser_latents]), _cat(batch.winner_time_ids, batch.loser_time_ids)


def winners_then_other_winners(batch: "TrainingBatch", generator: torch.Generator):
    """[winners; winners[perm]] (2B): pair b's loser is the winner of pair perm[b] (a derangement, never itself),
    with that winner's own time ids (SUDO's in-batch negatives)."""
    permutation = derangement(batch.winner_latents.shape[0], generator)
    others = batch.winner_time_ids[permutation] if batch.winner_time_ids is not None else None
    return torch.cat([batch.winner_latents, batch.winner_latents[permutation]]), _cat(batch.winner_time_ids, others)


# loss(policy_errors, reference_errors, reduce_mean, **the entry's config fields) -> (loss, statistics).
# Errors are laid out as the entry's layout: [winners; second half] (2B,) or winners (B,); reference_errors is
# None for objectives that do not use the reference.
ObjectiveLoss = Callable[..., tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    loss: ObjectiveLoss
    layout: Layout
    uses_reference: bool
    reads_losers: bool
    config_fields: tuple[str, ...] = ()
    check: Optional[Callable[[object], None]] = None  # check(config): raise InputError naming the flag

    @property
    def samples_per_pair(self) -> int:
        """U-Net samples per pair: 1 for the winners alone, 2 when each winner has a second sample beside it."""
        return 1 if self.layout is winners_only else 2

    def compute(self, policy_errors: torch.Tensor, reference_errors: Optional[torch.Tensor], config,
                reduce_mean: Optional[Callable]) -> tuple[torch.Tensor, dict]:
        """The loss and its statistics, the loss reading only this entry's config fields."""
        return self.loss(policy_errors, reference_errors, reduce_mean, **{name: getattr(config, name) for name in self.config_fields})


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add an objective to the table (its name becomes a --loss choice); a name already there is an error."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def objective_named(name: str) -> Objective:
    """The table's entry for `--loss name`; InputError naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise InputError(f"--loss must be one of {', '.join(OBJECTIVES)} (got {name!r})") from None


def objective_names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def _positive_beta(config) -> None:
    if config.beta <= 0:
        raise InputError(f"--beta must be > 0 for --loss {config.loss} (got {config.beta}): it scales the preference margin, "
                         "and at 0 the loss has no gradient")


def _popalign_check(config) -> None:
    _positive_beta(config)
    if config.lambda_winner == 0 and config.lambda_loser == 0:
        raise InputError("--lambda_winner and --lambda_loser are both 0: the PopAlign loss would be constant")


def _sudo_check(config) -> None:
    _positive_beta(config)
    if config.train_batch_size < 2:
        raise InputError("--loss sudo draws each loser from the other winners of the batch: --train_batch_size must be >= 2")


def _popalign(policy_errors, reference_errors, reduce_mean, beta, popalign_alpha, lambda_winner, lambda_loser, popalign_anchor):
    (model_err_w, model_err_l), (ref_err_w, ref_err_l) = policy_errors.chunk(2), reference_errors.chunk(2)
    return popalign_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=beta, alpha=popalign_alpha, lambda_w=lambda_winner,
                         lambda_l=lambda_loser, reduce_mean=reduce_mean, anchor=popalign_anchor)


def _dpo(policy_errors, reference_errors, reduce_mean, beta):
    (model_err_w, model_err_l), (ref_err_w, ref_err_l) = policy_errors.chunk(2), reference_errors.chunk(2)
    return diffusion_dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=beta)


def _sudo(policy_errors, reference_errors, reduce_mean, beta):
    (model_err_w, model_err_other), (ref_err_w, ref_err_other) = policy_errors.chunk(2), reference_errors.chunk(2)
    return sudo_loss(model_err_w, model_err_other, ref_err_w, ref_err_other, beta=beta)


def _sft(policy_errors, reference_errors, reduce_mean):
    return sft_loss(policy_errors)


register_objective(Objective(
    "popalign", "PopAlign (population-level Diffusion-DPO)", _popalign, winners_then_losers, uses_reference=True, reads_losers=True,
    config_fields=("beta", "popalign_alpha", "lambda_winner", "lambda_loser", "popalign_anchor"), check=_popalign_check))
register_objective(Objective(
    "dpo", "Diffusion-DPO", _dpo, winners_then_losers, uses_reference=True, reads_losers=True, config_fields=("beta",),
    check=_positive_beta))
register_objective(Objective(
    "sft", "supervised fine-tuning on the winners", _sft, winners_only, uses_reference=False, reads_losers=False))
register_objective(Objective(
    "sudo", "SUDO", _sudo, winners_then_other_winners, uses_reference=True, reads_losers=False, config_fields=("beta",),
    check=_sudo_check))
