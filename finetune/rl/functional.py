"""PPO arithmetic as small pure functions (fp32 tensors in, fp32 tensors out), each tested alone.

TRL no longer has a PPOTrainer (trl#7020), so this part is ours. Each formula cites its public
source; docs/ppo.md puts them together. Shapes: B sequences x R response tokens; `mask` is 1 on
response tokens up to and including the stop token, 0 after it.
"""

from __future__ import annotations

import torch


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, end index e, has_stop) for sampled responses [B, R].

    e is the first stop token, or R-1 when there is none; the mask covers 0..e, so the stop token
    itself is included (masks built as `ids != pad` drop the real EOS when pad == eos, trl#5303).
    Built from positions, never from token values after e.
    """
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    has_stop = is_stop.any(dim=1)
    R = responses.shape[1]
    first = torch.where(has_stop, is_stop.float().argmax(dim=1), torch.full_like(has_stop, R - 1, dtype=torch.long))
    positions = torch.arange(R, device=responses.device)[None, :]
    return (positions <= first[:, None]).float(), first, has_stop


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of policy vs reference from sampled tokens' log-probs.

    k1 = logp - ref_logp (unbiased, can be negative); k3 = e^u - 1 - u with u = ref_logp - logp
    (unbiased, always >= 0). http://joschu.net/blog/kl-approx.html
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        u = ref_logp - logp
        return torch.expm1(u) - u
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def shape_score(
    score: torch.Tensor,
    has_stop: torch.Tensor,
    missing_eos_penalty: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Normalise the reward-model score, penalise responses that never stopped (TRL's
    missing_eos_penalty), optionally clip (OpenRLHF clips to +-10)."""
    s = (score - mean) / std
    s = s - missing_eos_penalty * (~has_stop).float()
    return s.clamp(-clip, clip) if clip is not None else s


def token_rewards(
    score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, end: torch.Tensor, beta: float
) -> torch.Tensor:
    """r_t = -beta * kl_t * m_t, plus the sequence score at its end index e (not at e+1, the first
    pad, where TRL put it: trl#3750, trl#5338)."""
    rewards = -beta * kl * mask
    rewards[torch.arange(len(score)), end] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over masked tokens: (advantages, returns).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, G_t = A_t + V_t;
    rewards and values are zeroed outside the mask, so nothing after the stop token leaks in.
    https://arxiv.org/abs/1506.02438
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, all_reduce=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries of the whole batch; zero outside the mask.

    `all_reduce` (a sum over processes) makes the statistics those of every process's batch together."""
    reduce = all_reduce or (lambda t: t)
    n, total = reduce(torch.stack([mask.sum(), (x * mask).sum()]))
    mean = total / n
    var = reduce((((x - mean) * mask) ** 2).sum()) / n
    return (x - mean) / torch.sqrt(var + eps) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over masked tokens of max(-A rho, -A clip(rho, 1 +- eps)), rho = exp(logp - old).

    Also returns clipfrac and approxkl = 1/2 mean((logp - old)^2) (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "approxkl": (0.5 * masked_mean(log_ratio**2, mask)).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 1/2 mean over masked tokens of max((V - G)^2, (V_clipped - G)^2),
    V_clipped = V_old + clip(V - V_old, +-eps_v)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask).item()}
    return loss, stats


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Proportional controller for beta (Ziegler et al. 2019, lm-human-preferences): move beta so
    the observed KL approaches `target`; the error is clipped to +-20%."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n_steps / horizon)


def reward_readout_index(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Where a transformers sequence-classification reward model reads each row: the last token that is
    not the pad token. PPO must read where the reward model was trained to read; with pad == eos
    (Phi) that is the token before a closing EOS (trl#5303, docs/ppo.md), which is why a missing EOS is penalised
    separately (`shape_score`)."""
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    real = (ids != pad_id) & mask.bool()
    return (positions * real).argmax(dim=1)


def prompt_indices(n: int, batch: int, update: int, rank: int, world: int, seed: int) -> list[int]:
    """Row indices of the prompts process `rank` uses at `update`: walks one shuffled pass over the n
    prompts after another (a new shuffle each pass), processes taking consecutive slices. A pure
    function of its arguments, so a resumed run draws exactly the prompts the uninterrupted one would."""
    import random

    out, start = [], (update * world + rank) * batch
    perms: dict[int, list[int]] = {}
    for g in range(start, start + batch):
        epoch, i = divmod(g, n)
        if epoch not in perms:
            perm = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(perm)
            perms[epoch] = perm
        out.append(perms[epoch][i])
    return out
