"""Preference losses on per-sample denoising errors: PopAlign, Diffusion-DPO, SFT and SUDO.

Every function here is a pure function of tensors. The caller runs the U-Nets and passes, for a
batch of B pairs that share noise and timestep within each pair:

    model_err_w, model_err_l  (B,)  policy denoising errors of winners / losers (carry gradient)
    ref_err_w,   ref_err_l    (B,)  reference denoising errors (no gradient needed)

An error is `per_sample_denoising_error(prediction, target)`, the mean squared error over
(C, H, W). A lower error means a higher likelihood, so the implicit reward of a sample is

    g = ref_err - model_err        (positive when the policy denoises better than the reference)

Each loss returns `(loss, statistics)`: `loss` is the scalar to backpropagate, `statistics` a
dict of detached 0-dim tensors for logging (call `.item()` only when you log, to avoid a device
sync on every step).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

ReduceMean = Callable[[torch.Tensor], torch.Tensor]


def per_sample_denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """err_b = mean over (C, H, W) of (prediction_b - target_b)^2.

    prediction, target: (B, C, H, W) (any trailing shape); returns (B,) in float32, computed in
    float32 so that bf16 / fp16 predictions do not lose the small error differences the
    preference losses compare.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
    if prediction.dim() < 2:
        raise ValueError(f"expected a batch of samples (B, ...), got shape {tuple(prediction.shape)}")
    squared = (prediction.float() - target.float()).square()
    return squared.mean(dim=tuple(range(1, squared.dim())))


def _check_errors(**errors: torch.Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in errors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or first[0] == 0 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"per-sample errors must all have the same shape (B,) with B >= 1, got {shapes}")


def _accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Fraction of positive margins, ties counted as half right."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023), averaged over the B pairs.

        inside_b = -beta / 2 * ((m_w - m_l) - (r_w - r_l))_b  =  beta / 2 * (g_w - g_l)_b
        loss     = mean_b  -log sigmoid(inside_b)

    All inputs (B,). Statistics: implicit_accuracy = mean(inside > 0) (+0.5 per tie),
    mean_g_winner, mean_g_loser, mean_inside, model/ref errors of winners and losers.
    """
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    ref_err_w, ref_err_l = ref_err_w.detach(), ref_err_l.detach()
    inside = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        statistics = {
            "loss": loss.detach(),
            "implicit_accuracy": _accuracy(inside),
            "mean_inside": inside.mean(),
            "mean_g_winner": (ref_err_w - model_err_w).mean(),
            "mean_g_loser": (ref_err_l - model_err_l).mean(),
            "model_err_winner": model_err_w.mean(),
            "model_err_loser": model_err_l.mean(),
            "ref_err_winner": ref_err_w.mean(),
            "ref_err_loser": ref_err_l.mean(),
        }
    return loss, statistics


def popalign_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    alpha: float = 0.5,
    lambda_w: float = 1.0,
    lambda_l: float = 1.0,
    reduce_mean: Optional[ReduceMean] = None,
    anchor: str = "pooled",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PopAlign: every sample is scored against one anchor pooled over the whole global batch.

        g_i = r_i - m_i                                        per sample, winners and losers
        z   = stopgrad(alpha * mean_global(g_w) + (1 - alpha) * mean_global(g_l))
        loss = 1/(2B) * [ sum_b lambda_w * -log sigmoid( beta * (g_w,b - z))
                        + sum_b lambda_l * -log sigmoid(-beta * (g_l,b - z)) ]

    Winners are pushed above the anchor and losers below it. Because z is pooled over the global
    batch (not taken per pair), a winner is compared with the population of losers, which is what
    makes the objective population-level; the global batch size is therefore a real
    hyperparameter. If z were instead each pair's own midpoint (B = 1, alpha = 0.5), the loss and
    its gradient equal Diffusion-DPO's for that pair: each of the two terms is
    -log sigmoid(beta / 2 * (g_w - g_l)), so their sum is 2x DPO and their mean exactly DPO.

    `anchor` chooses z, to isolate what pooling adds (ANCHORS):
        "pooled"    z as above, one value for the global batch (the original PopAlign)
        "per_pair"  z_b = stopgrad(alpha * g_w,b + (1 - alpha) * g_l,b), pair b's own point
                    (with alpha = 0.5 and lambda_w = lambda_l = 1: exactly Diffusion-DPO with the same beta)
        "none"      z = 0: each sample against the reference alone

    Inputs (B,) per process. `reduce_mean(t)` must return `t` averaged element-wise over all
    processes (same shape); it is called once, on the (2,) tensor [local mean g_w, local mean
    g_l], so with equal B on every process the result is the global-batch mean. None means a
    single process. Each process then averages its own 2B terms; gradient averaging across
    processes (DDP) completes the global mean.

    Statistics: implicit_accuracy = fraction of the 2B samples on their correct side of the
    anchor (+0.5 per tie), pair_accuracy = mean(g_w > g_l), anchor, global_mean_g_winner,
    global_mean_g_loser, local mean_g_winner / mean_g_loser, model/ref errors.
    """
    _check_errors(model_err_w=model_err_w, model_err_l=model_err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if anchor not in ANCHORS:
        raise ValueError(f"unknown PopAlign anchor {anchor!r} (known: {', '.join(ANCHORS)})")
    g_w = ref_err_w.detach() - model_err_w
    g_l = ref_err_l.detach() - model_err_l
    local_means = torch.stack([g_w.detach().mean(), g_l.detach().mean()])
    # Every process takes part in the all-reduce whatever the anchor, so the statistics stay global.
    global_means = local_means if reduce_mean is None else reduce_mean(local_means)
    if global_means.shape != local_means.shape:
        raise ValueError(f"reduce_mean changed the shape {tuple(local_means.shape)} -> {tuple(global_means.shape)}")
    global_means = global_means.detach()
    pooled_anchor = alpha * global_means[0] + (1.0 - alpha) * global_means[1]
    if anchor == "pooled":
        anchor_value = pooled_anchor
    elif anchor == "per_pair":
        anchor_value = (alpha * g_w + (1.0 - alpha) * g_l).detach()
    else:
        anchor_value = torch.zeros_like(pooled_anchor)
    anchor = anchor_value
    winner_margin = beta * (g_w - anchor)
    loser_margin = -beta * (g_l - anchor)
    winner_terms = lambda_w * -F.logsigmoid(winner_margin)
    loser_terms = lambda_l * -F.logsigmoid(loser_margin)
    loss = torch.cat([winner_terms, loser_terms]).mean()
    with torch.no_grad():
        statistics = {
            "loss": loss.detach(),
            "implicit_accuracy": _accuracy(torch.cat([winner_margin, loser_margin])),
            "pair_accuracy": _accuracy(g_w - g_l),
            "anchor": anchor.mean(),
            "global_mean_g_winner": global_means[0],
            "global_mean_g_loser": global_means[1],
            "mean_g_winner": local_means[0],
            "mean_g_loser": local_means[1],
            "model_err_winner": model_err_w.mean(),
            "model_err_loser": model_err_l.mean(),
            "ref_err_winner": ref_err_w.mean(),
            "ref_err_loser": ref_err_l.mean(),
        }
    return loss, statistics


# The choices of PopAlign's anchor z (popalign_loss).
ANCHORS = ("pooled", "per_pair", "none")


def sft_loss(model_err_w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on the winners only: loss = mean_b m_w,b. Input (B,)."""
    _check_errors(model_err_w=model_err_w)
    loss = model_err_w.mean()
    return loss, {"loss": loss.detach(), "model_err_winner": loss.detach()}


def with_prior_preservation(loss: torch.Tensor, statistics: dict[str, torch.Tensor], model_err_identity: torch.Tensor,
                            weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Add a prior-preservation term to an objective: loss' = loss + weight * mean_b m_id,b.

    m_id,b (B,) is the policy error of winner b denoised under its OWN prompt c_id (the identity-specific
    one it was generated from), with the pair's noise and timestep, towards one of two targets:

        noise:      m_id,b = || f_theta(x_t, c_id) - target(x_0, eps, t) ||^2   (DreamBooth's prior
                    preservation with the model's own samples: fit the winners under their prompts)
        reference:  m_id,b = || f_theta(x_t, c_id) - f_ref(x_t, c_id) ||^2     (keep the base model's
                    prediction there; 0 while the policy equals the reference)

    (squares are per-element means). The objective tunes the neutral caption; this term keeps what the
    identity-specific prompts draw, so that what is learned on the neutral caption does not overwrite it.
    """
    _check_errors(model_err_identity=model_err_identity)
    if weight < 0:
        raise ValueError(f"prior preservation weight must be >= 0, got {weight}")
    identity_term = model_err_identity.mean()
    total = loss + weight * identity_term
    return total, dict(statistics, loss=total.detach(), model_err_identity_prompt=identity_term.detach())


def derangement(batch_size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly random permutation of range(batch_size) with no fixed point, shape (batch_size,).

    Drawn by rejection (a random permutation is a derangement with probability ~1/e), so it is
    uniform over derangements and deterministic for a seeded `generator`.
    """
    if batch_size < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got batch_size={batch_size}: "
                         "SUDO pairs each winner with another winner of the batch, so it needs >= 2 pairs per batch")
    identity = torch.arange(batch_size)
    while True:
        permutation = torch.randperm(batch_size, generator=generator)
        if not bool((permutation == identity).any()):
            return permutation


def sudo_loss(
    model_err_w: torch.Tensor,
    model_err_other: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_other: torch.Tensor,
    beta: float,
    sft_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SUDO (self-supervised DPO): Diffusion-DPO with in-batch negatives, plus SFT on the winners.

    Pair b's loser is another winner image of the batch, `winner_latents[perm[b]]` with
    `perm = derangement(B, generator)`, denoised under pair b's OWN caption, with pair b's noise
    and timestep. So for pair b:

        model_err_w[b]     = err(policy,    winner_latents[b],       caption[b])
        model_err_other[b] = err(policy,    winner_latents[perm[b]], caption[b])
        ref_err_w[b], ref_err_other[b]: the same with the reference model

        loss = (1 - sft_weight) * DPO(model_err_w, model_err_other, ref_err_w, ref_err_other, beta)
               + sft_weight * mean_b model_err_w[b]

    With the default sft_weight 0.5: loss = 0.5 * DPO + 0.5 * SFT. All inputs (B,).
    Statistics: those of diffusion_dpo_loss, plus dpo_loss and sft_loss.
    """
    if not 0.0 <= sft_weight <= 1.0:
        raise ValueError(f"sft_weight must be in [0, 1], got {sft_weight}")
    dpo, statistics = diffusion_dpo_loss(model_err_w, model_err_other, ref_err_w, ref_err_other, beta)
    sft, _ = sft_loss(model_err_w)
    loss = (1.0 - sft_weight) * dpo + sft_weight * sft
    statistics = {**statistics, "loss": loss.detach(), "dpo_loss": dpo.detach(), "sft_loss": sft.detach()}
    return loss, statistics
