"""The critic-free (GRPO family) arithmetic, each function against a small reference loop written from the
papers' formulas: group / batch / no scaling (GRPO, PPO-lite, Dr. GRPO), RLOO, REINFORCE++, dynamic sampling,
the soft overlong penalty, clip-higher with the k3 KL term, and the four loss aggregations."""

import math
import statistics

import pytest
import torch

from finetune.rl.functional import (
    advantages_for,
    clipped_token_loss,
    group_advantages,
    informative_groups,
    loss_weights,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
)

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0])
K = 4


def groups(r, k):
    return [r[i : i + k] for i in range(0, len(r), k)]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_a_reference_loop(scale):
    r = REWARDS.tolist()
    expected = []
    for g in groups(r, K):
        mean = sum(g) / K
        for x in g:
            if scale == "none":
                expected.append(x - mean)
            elif scale == "group":
                expected.append((x - mean) / (statistics.stdev(g) + 1e-4))
            else:
                expected.append((x - mean) / (statistics.stdev(r) + 1e-4))
    got = group_advantages(REWARDS, K, scale)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    # a group of equal rewards gets zero advantage however it is scaled
    assert torch.equal(got[4:8], torch.zeros(4))


def test_rloo_baseline_is_the_mean_of_the_others():
    r = REWARDS.tolist()
    expected = [x - (sum(g) - x) / (K - 1) for g in groups(r, K) for x in g]
    assert torch.allclose(rloo_advantages(REWARDS, K), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(rloo_advantages(REWARDS, K), K / (K - 1) * group_advantages(REWARDS, K, "none"))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(REWARDS, 1)


def test_reinforce_pp_uses_one_global_baseline_and_scale():
    r = REWARDS.tolist()
    mean = sum(r) / len(r)
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / len(r))
    expected = [(x - mean) / math.sqrt(std**2 + 1e-8) for x in r]
    got = reinforce_pp_advantages(REWARDS)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert got[4:8].abs().min() > 0  # unlike a group baseline, an all-equal group still gets a signal
    assert torch.equal(advantages_for("reinforce_pp", REWARDS, K), got)
    with pytest.raises(ValueError, match="use grpo, rloo or reinforce_pp"):
        advantages_for("gae", REWARDS, K)


def test_whole_groups_only():
    with pytest.raises(ValueError, match="not whole groups of 4"):
        group_advantages(REWARDS[:10], K)


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    keep = informative_groups(REWARDS, K)
    assert keep.tolist() == [True, False, True]
    assert informative_groups(torch.ones(6), 3).tolist() == [False, False]


def test_soft_overlong_penalty_follows_dapo_eq_13():
    L, cache = 20, 5
    lengths = torch.tensor([1, 15, 16, 18, 20, 21])

    def reference(n):
        if n <= L - cache:
            return 0.0
        if n <= L:
            return ((L - cache) - n) / cache
        return -1.0

    expected = torch.tensor([0.5 * reference(int(n)) for n in lengths])
    assert torch.allclose(overlong_penalty(lengths, L, cache, factor=0.5), expected)
    assert torch.equal(overlong_penalty(lengths, L, 0), torch.zeros(6))


def test_clip_higher_and_k3_kl_match_a_reference_loop():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g) * 2
    logp = old + torch.randn(3, 5, generator=g) * 0.4
    ref = old + torch.randn(3, 5, generator=g) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.2])
    lo, hi, beta = 0.2, 0.28, 0.04
    loss, stats = clipped_token_loss(logp, old, adv, lo, hi, ref, beta, bias_correction_kl=False)
    for b in range(3):
        for t in range(5):
            rho = math.exp(logp[b, t] - old[b, t])
            a = adv[b].item()
            surrogate = min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
            u = (ref[b, t] - logp[b, t]).item()
            k3 = math.exp(u) - u - 1
            assert loss[b, t].item() == pytest.approx(-surrogate + beta * k3, abs=1e-5)
    corrected, _ = clipped_token_loss(logp, old, adv, lo, hi, ref, beta, bias_correction_kl=True)
    assert torch.allclose(corrected - loss, beta * stats["kl"] * (torch.exp(logp - old) - 1), atol=1e-6)
    # clip-higher: a ratio of 1.25 on a positive advantage is clipped at 1.2, not at 1.28
    one = torch.zeros(1, 1)
    sym, _ = clipped_token_loss(one + math.log(1.25), one, torch.tensor([1.0]), 0.2, None)
    asym, s = clipped_token_loss(one + math.log(1.25), one, torch.tensor([1.0]), 0.2, 0.28)
    assert sym.item() == pytest.approx(-1.2) and asym.item() == pytest.approx(-1.25) and not s["clip_high"].any()
    with pytest.raises(ValueError, match="reference log-probs"):
        clipped_token_loss(logp, old, adv, beta=0.1)


def test_at_the_first_step_the_ratio_is_one_and_the_kl_zero():
    logp = -torch.rand(2, 4)
    loss, stats = clipped_token_loss(logp, logp.detach(), torch.tensor([1.0, -2.0]), 0.2, 0.28, logp, 0.1)
    assert torch.equal(stats["ratio"], torch.ones(2, 4)) and torch.equal(stats["kl"], torch.zeros(2, 4))
    assert torch.equal(loss, torch.tensor([[-1.0] * 4, [2.0] * 4]))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_loss_aggregations_match_a_reference_loop(loss_type):
    """The minibatch loss summed over two micro-batches equals the formula written per completion."""
    g = torch.Generator().manual_seed(1)
    per_token = torch.randn(4, 6, generator=g)
    lengths = [2, 6, 1, 4]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    tokens, sequences, max_length = sum(lengths), 4, 6
    if loss_type == "grpo":
        expected = sum(per_token[i, :n].sum().item() / n for i, n in enumerate(lengths)) / sequences
    elif loss_type in ("bnpo", "dapo"):
        expected = sum(per_token[i, :n].sum().item() for i, n in enumerate(lengths)) / tokens
    else:
        expected = sum(per_token[i, :n].sum().item() for i, n in enumerate(lengths)) / (sequences * max_length)
    total = sum(
        (loss_weights(mask[sl], loss_type, sequences, tokens, max_length) * per_token[sl]).sum().item()
        for sl in (slice(0, 2), slice(2, 4))
    )
    assert total == pytest.approx(expected, rel=1e-6)


def test_grpo_aggregation_weights_short_completions_more_per_token():
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    grpo = loss_weights(mask, "grpo", 2, 5)
    dapo = loss_weights(mask, "dapo", 2, 5)
    assert grpo[0, 0] == 4 * grpo[1, 0]  # the length bias Dr. GRPO and DAPO remove
    assert dapo[0, 0] == dapo[1, 0]
    with pytest.raises(ValueError, match="use grpo, bnpo, dapo or dr_grpo"):
        loss_weights(mask, "sum", 2, 5)
