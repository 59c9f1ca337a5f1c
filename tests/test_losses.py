"""The preference losses against hand-computed values and an independent loop implementation."""

import math

import pytest
import torch

from popalign.losses import (
    derangement,
    diffusion_dpo_loss,
    per_sample_denoising_error,
    popalign_loss,
    sft_loss,
    sudo_loss,
    with_prior_preservation,
)


def log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)) computed without overflow for large |x|."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def slow_popalign(m_w, m_l, r_w, r_l, beta, alpha, lambda_w, lambda_l, other_processes=()):
    """Plain-Python PopAlign over a global batch: this process's lists plus other processes' lists.

    other_processes: sequence of (m_w, m_l, r_w, r_l) lists of the same length as this one's.
    Returns (loss of this process, anchor).
    """
    all_winner_g, all_loser_g = [], []
    for batch in [(m_w, m_l, r_w, r_l), *other_processes]:
        all_winner_g += [r - m for m, r in zip(batch[0], batch[2])]
        all_loser_g += [r - m for m, r in zip(batch[1], batch[3])]
    anchor = alpha * sum(all_winner_g) / len(all_winner_g) + (1 - alpha) * sum(all_loser_g) / len(all_loser_g)
    terms = []
    for m, r in zip(m_w, r_w):
        terms.append(-lambda_w * log_sigmoid(beta * ((r - m) - anchor)))
    for m, r in zip(m_l, r_l):
        terms.append(-lambda_l * log_sigmoid(-beta * ((r - m) - anchor)))
    return sum(terms) / len(terms), anchor


def slow_dpo(m_w, m_l, r_w, r_l, beta):
    total = 0.0
    for mw, ml, rw, rl in zip(m_w, m_l, r_w, r_l):
        total += -log_sigmoid(-beta / 2 * ((mw - ml) - (rw - rl)))
    return total / len(m_w)


def random_errors(batch_size, seed, scale=0.01):
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(4, batch_size, generator=generator, dtype=torch.float64) * 0.2 + 0.1
    jitter = torch.randn(4, batch_size, generator=generator, dtype=torch.float64) * scale
    return [row.clone() for row in base + jitter]


def test_per_sample_denoising_error_hand_values():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    error = per_sample_denoising_error(prediction, target)
    assert error.shape == (2,)
    torch.testing.assert_close(error, torch.tensor([(1 + 4 + 9 + 16) / 4, 0.25]))


def test_per_sample_denoising_error_is_float32_for_bf16_and_checks_shapes():
    prediction = torch.ones(3, 4, 2, 2, dtype=torch.bfloat16)
    assert per_sample_denoising_error(prediction, torch.zeros_like(prediction)).dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        per_sample_denoising_error(torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 3))


def test_dpo_hand_value():
    # inside = -beta/2 * ((0.3 - 0.5) - (0.4 - 0.4)) = -50 * -0.2 = 10 for beta = 100
    loss, statistics = diffusion_dpo_loss(torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.4]),
                                          torch.tensor([0.4]), beta=100)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-10)), rel=1e-5)
    assert statistics["implicit_accuracy"].item() == 1.0
    assert statistics["mean_g_winner"].item() == pytest.approx(0.1)
    assert statistics["mean_g_loser"].item() == pytest.approx(-0.1)


def test_popalign_hand_value():
    # g_w = [0.1, 0.0], g_l = [-0.1, 0.2]; z = 0.5 * 0.05 + 0.5 * 0.05 = 0.05; beta = 10
    # winner margins 10 * [0.05, -0.05] = [0.5, -0.5]; loser margins -10 * [-0.15, 0.15] = [1.5, -1.5]
    model_w, ref_w = torch.tensor([0.2, 0.3]), torch.tensor([0.3, 0.3])
    model_l, ref_l = torch.tensor([0.5, 0.1]), torch.tensor([0.4, 0.3])
    loss, statistics = popalign_loss(model_w, model_l, ref_w, ref_l, beta=10)
    expected = -(log_sigmoid(0.5) + log_sigmoid(-0.5) + log_sigmoid(1.5) + log_sigmoid(-1.5)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert statistics["anchor"].item() == pytest.approx(0.05, abs=1e-7)
    assert statistics["implicit_accuracy"].item() == 0.5
    assert statistics["mean_g_winner"].item() == pytest.approx(0.05, abs=1e-7)
    assert statistics["mean_g_loser"].item() == pytest.approx(0.05, abs=1e-7)
    assert statistics["pair_accuracy"].item() == 0.5  # 0.1 > -0.1, 0.0 < 0.2


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha,lambda_w,lambda_l,beta", [(0.5, 1.0, 1.0, 5000.0), (0.3, 2.0, 0.5, 200.0)])
def test_popalign_matches_slow_loop(seed, alpha, lambda_w, lambda_l, beta):
    m_w, m_l, r_w, r_l = random_errors(7, seed, scale=1e-3)
    loss, statistics = popalign_loss(m_w, m_l, r_w, r_l, beta, alpha, lambda_w, lambda_l)
    expected_loss, expected_anchor = slow_popalign(m_w.tolist(), m_l.tolist(), r_w.tolist(), r_l.tolist(),
                                                   beta, alpha, lambda_w, lambda_l)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    assert statistics["anchor"].item() == pytest.approx(expected_anchor, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_dpo_matches_slow_loop(seed):
    m_w, m_l, r_w, r_l = random_errors(6, seed, scale=1e-3)
    loss, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=5000)
    assert loss.item() == pytest.approx(slow_dpo(m_w.tolist(), m_l.tolist(), r_w.tolist(), r_l.tolist(), 5000), rel=1e-9)


@pytest.mark.parametrize("lambda_w,lambda_l", [(1.0, 1.0), (3.0, 0.5)])
def test_policy_equal_to_reference_gives_log2(lambda_w, lambda_l):
    errors_w, errors_l = torch.tensor([0.2, 0.7, 0.1]), torch.tensor([0.4, 0.3, 0.9])
    loss, statistics = popalign_loss(errors_w, errors_l, errors_w.clone(), errors_l.clone(), beta=5000,
                                      lambda_w=lambda_w, lambda_l=lambda_l)
    # half the samples carry lambda_w, half lambda_l, each term -log sigmoid(0) = log 2
    assert loss.item() == pytest.approx((lambda_w + lambda_l) / 2 * math.log(2), rel=1e-6)
    assert statistics["anchor"].item() == 0.0
    dpo, _ = diffusion_dpo_loss(errors_w, errors_l, errors_w.clone(), errors_l.clone(), beta=5000)
    assert dpo.item() == pytest.approx(math.log(2), rel=1e-6)


def test_popalign_with_a_per_pair_anchor_is_dpo():
    """Anchoring each pair at its own midpoint (B = 1 calls) gives back Diffusion-DPO, value and gradient."""
    beta = 300.0
    m_w, m_l, r_w, r_l = random_errors(5, seed=11, scale=5e-3)
    m_w.requires_grad_(True)
    m_l.requires_grad_(True)
    per_pair_losses = [popalign_loss(m_w[b:b + 1], m_l[b:b + 1], r_w[b:b + 1], r_l[b:b + 1], beta)[0] for b in range(5)]
    per_pair_mean = torch.stack(per_pair_losses).mean()
    dpo, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta)
    # the two terms of a pair sum to 2x that pair's DPO term; their mean is the DPO term itself
    assert (2 * per_pair_mean).item() == pytest.approx(2 * dpo.item(), rel=1e-10)
    popalign_grads = torch.autograd.grad(per_pair_mean, [m_w, m_l])
    dpo_grads = torch.autograd.grad(dpo, [m_w, m_l])
    for popalign_grad, dpo_grad in zip(popalign_grads, dpo_grads):
        torch.testing.assert_close(popalign_grad, dpo_grad)
    # the pooled anchor is a different objective on the same data
    pooled, _ = popalign_loss(m_w, m_l, r_w, r_l, beta)
    assert abs(pooled.item() - dpo.item()) > 1e-3


def test_the_per_pair_anchor_choice_is_dpo_in_one_call():
    beta = 300.0
    m_w, m_l, r_w, r_l = random_errors(5, seed=12, scale=5e-3)
    m_w.requires_grad_(True)
    m_l.requires_grad_(True)
    per_pair, statistics = popalign_loss(m_w, m_l, r_w, r_l, beta, anchor="per_pair")
    dpo, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta)
    assert per_pair.item() == pytest.approx(dpo.item(), rel=1e-10)
    for ours, theirs in zip(torch.autograd.grad(per_pair, [m_w, m_l], retain_graph=True),
                            torch.autograd.grad(dpo, [m_w, m_l])):
        torch.testing.assert_close(ours, theirs)
    g_w, g_l = (r_w - m_w).detach(), (r_l - m_l).detach()
    assert statistics["anchor"].item() == pytest.approx(((g_w + g_l) / 2).mean().item(), rel=1e-9)


def test_no_anchor_by_hand_and_unknown_anchor():
    # g_w = [0.1, 0.0], g_l = [-0.1, 0.2], z = 0, beta = 10: winner margins [1, 0], loser margins [1, -2].
    model_w, ref_w = torch.tensor([0.2, 0.3]), torch.tensor([0.3, 0.3])
    model_l, ref_l = torch.tensor([0.5, 0.1]), torch.tensor([0.4, 0.3])
    loss, statistics = popalign_loss(model_w, model_l, ref_w, ref_l, beta=10, anchor="none")
    expected = -(log_sigmoid(1.0) + log_sigmoid(0.0) + log_sigmoid(1.0) + log_sigmoid(-2.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert statistics["anchor"].item() == 0.0
    # The pooled anchor of the same numbers is 0.05 (test_popalign_hand_value): a different loss.
    assert abs(loss.item() - popalign_loss(model_w, model_l, ref_w, ref_l, beta=10)[0].item()) > 1e-3
    with pytest.raises(ValueError, match="unknown PopAlign anchor"):
        popalign_loss(model_w, model_l, ref_w, ref_l, beta=10, anchor="global")


@pytest.mark.parametrize("name", ["popalign", "dpo", "sudo", "sft"])
def test_gradient_pushes_winner_error_down_and_loser_error_up(name):
    m_w, m_l, r_w, r_l = random_errors(4, seed=3)
    m_w.requires_grad_(True)
    m_l.requires_grad_(True)
    if name == "popalign":
        loss, _ = popalign_loss(m_w, m_l, r_w, r_l, beta=500)
    elif name == "dpo":
        loss, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=500)
    elif name == "sudo":
        loss, _ = sudo_loss(m_w, m_l, r_w, r_l, beta=500)
    else:
        loss, _ = sft_loss(m_w)
    loss.backward()
    # gradient descent moves errors by -grad: a positive grad lowers the winner error
    assert (m_w.grad > 0).all()
    if name == "sft":
        assert m_l.grad is None
    else:
        assert (m_l.grad < 0).all()
    # the reference never receives gradient through the loss
    assert r_w.grad is None and r_l.grad is None


def test_reference_errors_are_treated_as_constants():
    m_w, m_l, r_w, r_l = random_errors(3, seed=5)
    r_w.requires_grad_(True)
    r_l.requires_grad_(True)
    loss, _ = popalign_loss(m_w.requires_grad_(True), m_l, r_w, r_l, beta=100)
    loss.backward()
    assert r_w.grad is None and r_l.grad is None


def test_reduce_mean_pools_the_anchor_over_processes():
    beta, alpha = 400.0, 0.3
    mine = random_errors(3, seed=21)
    other = random_errors(3, seed=22)
    other_g_means = torch.stack([(other[2] - other[0]).mean(), (other[3] - other[1]).mean()])
    calls = []

    def reduce_mean_with_other_process(local_means):
        calls.append(local_means.clone())
        return (local_means + other_g_means) / 2

    loss, statistics = popalign_loss(*mine, beta=beta, alpha=alpha, reduce_mean=reduce_mean_with_other_process)
    expected_loss, expected_anchor = slow_popalign(*[t.tolist() for t in mine], beta, alpha, 1.0, 1.0,
                                                   other_processes=[[t.tolist() for t in other]])
    assert len(calls) == 1
    assert statistics["anchor"].item() == pytest.approx(expected_anchor, rel=1e-9)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9)
    alone, alone_statistics = popalign_loss(*mine, beta=beta, alpha=alpha)
    assert abs(alone_statistics["anchor"].item() - expected_anchor) > 1e-4
    assert abs(alone.item() - loss.item()) > 1e-4


def test_sft_and_sudo_hand_values():
    m_w, m_l = torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.3])
    r_w, r_l = torch.tensor([0.25, 0.4]), torch.tensor([0.3, 0.35])
    sft, _ = sft_loss(m_w)
    assert sft.item() == pytest.approx(0.3)
    # inside = -5 * ((m_w - m_l) - (r_w - r_l)) = -5 * ([-0.1, 0.1] - [-0.05, 0.05]) = [0.25, -0.25]
    dpo_expected = -(log_sigmoid(0.25) + log_sigmoid(-0.25)) / 2
    loss, statistics = sudo_loss(m_w, m_l, r_w, r_l, beta=10)
    assert statistics["dpo_loss"].item() == pytest.approx(dpo_expected, rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * dpo_expected + 0.5 * 0.3, rel=1e-5)
    assert statistics["implicit_accuracy"].item() == 0.5


def test_prior_preservation_adds_the_weighted_mean_identity_error():
    loss, statistics = sft_loss(torch.tensor([0.2, 0.4]))
    # loss' = 0.3 + 0.5 * mean([0.1, 0.7]) = 0.3 + 0.5 * 0.4 = 0.5
    total, total_statistics = with_prior_preservation(loss, statistics, torch.tensor([0.1, 0.7]), weight=0.5)
    assert total.item() == pytest.approx(0.5)
    assert total_statistics["loss"].item() == pytest.approx(0.5)
    assert total_statistics["model_err_identity_prompt"].item() == pytest.approx(0.4)
    assert total_statistics["model_err_winner"].item() == pytest.approx(0.3)  # the objective's own statistics are kept
    identity_errors = torch.tensor([0.1, 0.7], requires_grad=True)
    with_prior_preservation(loss, statistics, identity_errors, weight=0.5)[0].backward()
    assert identity_errors.grad.tolist() == pytest.approx([0.25, 0.25])  # weight / B
    unchanged, _ = with_prior_preservation(loss, statistics, torch.tensor([0.1, 0.7]), weight=0.0)
    assert unchanged.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="must be >= 0"):
        with_prior_preservation(loss, statistics, torch.tensor([0.1, 0.7]), weight=-1.0)


def test_derangement_never_has_a_fixed_point_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for batch_size in [2, 3, 4, 8]:
        for _ in range(200):
            permutation = derangement(batch_size, generator)
            assert sorted(permutation.tolist()) == list(range(batch_size))
            assert all(permutation[i].item() != i for i in range(batch_size))
            if batch_size == 4:
                seen.add(tuple(permutation.tolist()))
    assert len(seen) == 9  # all derangements of 4 elements are reachable
    first = derangement(6, torch.Generator().manual_seed(7))
    assert torch.equal(first, derangement(6, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("batch_size", [0, 1])
def test_derangement_of_fewer_than_two_is_an_error(batch_size):
    with pytest.raises(ValueError, match="at least 2"):
        derangement(batch_size, torch.Generator().manual_seed(0))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        popalign_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), beta=1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        diffusion_dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), beta=1)
