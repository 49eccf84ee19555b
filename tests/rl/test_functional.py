"""The PPO arithmetic as pure functions: masks, KL, reward placement, GAE, whitening, clipped losses."""

import pytest
import torch

from finetune.rl.functional import (
    adaptive_kl_beta,
    gae,
    kl_per_token,
    masked_whiten,
    policy_loss,
    response_mask,
    shape_score,
    token_rewards,
    value_loss,
)

EOS, PAD = 2, 2  # pad == eos, the Phi case


def test_response_mask_includes_eos_and_handles_start_middle_and_missing():
    responses = torch.tensor(
        [
            [EOS, 5, 6, PAD],  # stop at 0
            [5, 6, EOS, PAD],  # stop in the middle
            [5, 6, 7, 8],
        ]
    )  # never stops
    mask, end, has_stop = response_mask(responses, [EOS])
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert end.tolist() == [0, 2, 3] and has_stop.tolist() == [True, True, False]
    naive = (responses != PAD).float()  # what `ids != pad` would give: drops the real EOS
    assert naive[1, 2] == 0 and mask[1, 2] == 1


def test_kl_estimators_zero_at_identity_and_k3_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g) * 3
    assert torch.equal(kl_per_token(logp, logp, "k1"), torch.zeros_like(logp))
    assert torch.equal(kl_per_token(logp, logp, "k3"), torch.zeros_like(logp))
    other = -torch.rand(4, 6, generator=g) * 3
    assert (kl_per_token(logp, other, "k3") >= 0).all()
    with pytest.raises(ValueError, match="use k1 or k3"):
        kl_per_token(logp, other, "k2")


def test_rewards_put_the_score_at_the_stop_token_and_sum_to_score_minus_kl():
    responses = torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8]])
    mask, end, has_stop = response_mask(responses, [EOS])
    kl = torch.tensor([[0.1, 0.2, 9.0, 9.0], [0.1, 0.1, 0.1, 0.1]])  # junk after the stop must not count
    score = shape_score(torch.tensor([2.0, 2.0]), has_stop, missing_eos_penalty=1.0)
    assert score.tolist() == [2.0, 1.0]
    r = token_rewards(score, kl, mask, end, beta=0.5)
    assert torch.allclose(r.sum(1), score - 0.5 * (kl * mask).sum(1))
    assert r[0, 1] == pytest.approx(2.0 - 0.1) and r[0, 2] == 0 and r[1, 3] == pytest.approx(1.0 - 0.05)


def reference_gae(rewards, values, mask, gamma, lam):
    B, R = rewards.shape
    adv = torch.zeros(B, R)
    for b in range(B):
        last = 0.0
        for t in reversed(range(R)):
            if mask[b, t] == 0:
                continue
            nv = values[b, t + 1] if t + 1 < R and mask[b, t + 1] else 0.0
            delta = rewards[b, t] + gamma * nv - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0)])
def test_gae_matches_a_reference_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    mask, _, _ = response_mask(torch.tensor([[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 9], [EOS, 1, 1, 1, 1]]), [EOS])
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards * mask, values * mask, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-6) and torch.allclose(ret, ref_ret, atol=1e-6)


def test_gae_with_unit_discount_and_zero_values_is_reverse_cumsum():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, _ = gae(r, torch.zeros_like(r), mask, 1.0, 1.0)
    assert adv.tolist() == [[6.0, 5.0, 3.0, 0.0]]


def test_whitening_over_masked_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0 and abs(w[0, :3].mean()) < 1e-6 and abs(w[0, :3].pow(2).mean() - 1) < 1e-4


def test_policy_loss_at_step_zero_and_padding_invariance():
    g = torch.Generator().manual_seed(2)
    mask, _, _ = response_mask(torch.tensor([[5, EOS, PAD], [5, 6, 7]]), [EOS])
    old = -torch.rand(2, 3, generator=g)
    adv = torch.randn(2, 3, generator=g)
    logp = old.clone().requires_grad_()
    loss, stats = policy_loss(logp, old, adv, mask)
    assert stats["clipfrac"] == 0 and stats["approxkl"] == 0 and stats["ratio_mean"] == 1
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item())
    loss.backward()
    grad = logp.grad.clone()
    # change everything after the stop token: loss and gradients are bitwise the same
    old2, adv2 = old.clone(), adv.clone()
    old2[0, 2], adv2[0, 2] = -50.0, 123.0
    logp2 = old.clone()
    logp2[0, 2] = 7.0
    logp2.requires_grad_()
    loss2, _ = policy_loss(logp2, old2, adv2, mask)
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(grad[mask.bool()], logp2.grad[mask.bool()])
    assert logp2.grad[0, 2] == 0


def test_policy_and_value_clipping():
    mask = torch.ones(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    loss, stats = policy_loss(torch.tensor([[1.0, -1.0]]), old, adv, mask, clip=0.2)
    # ratio e and 1/e: both clipped terms are the pessimistic ones
    assert loss.item() == pytest.approx(((-1.2) + (0.8)) / 2) and stats["clipfrac"] == 1.0
    v_loss, v_stats = value_loss(
        torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), clip=0.2
    )
    assert v_loss.item() == pytest.approx(0.5 * max((1.0 - 0.5) ** 2, (0.2 - 0.5) ** 2))


def test_adaptive_beta_moves_towards_the_target():
    assert adaptive_kl_beta(0.1, kl=12.0, target=6.0, horizon=10000, n_steps=100) > 0.1
    assert adaptive_kl_beta(0.1, kl=3.0, target=6.0, horizon=10000, n_steps=100) < 0.1
    assert adaptive_kl_beta(0.1, kl=6.0, target=6.0, horizon=10000, n_steps=100) == pytest.approx(0.1)
