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


# ----------------------------------------------------------------------------- critic-free methods (GRPO family)
# One scalar reward per completion; `k` completions per prompt, laid out prompt by prompt ([p0 x k, p1 x k, ...]).
# The advantage of a completion is given to every one of its tokens; no value model.

EPS_STD = 1e-4  # TRL's GRPOTrainer adds 1e-4 to the std (trl/trainer/grpo_trainer.py, _generate_and_score_completions)


def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    if rewards.dim() != 1 or len(rewards) % k:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {k} completions per prompt")
    return rewards.view(-1, k)


def group_advantages(rewards: torch.Tensor, k: int, scale: str = "group", eps: float = EPS_STD) -> torch.Tensor:
    """GRPO's advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, eq. 3): r minus the mean of its
    prompt's group, divided by the group's standard deviation (`scale="group"`), by the whole batch's
    (`"batch"`, Hu et al. 2025's PPO-lite choice, arXiv:2508.08221) or by nothing (`"none"`: Dr. GRPO, Liu et
    al. 2025, arXiv:2503.20783, which shows the division over-weights prompts that are nearly always right or
    wrong). Standard deviations are the unbiased (n - 1) ones, + eps, as TRL's GRPOTrainer computes them."""
    g = _groups(rewards, k)
    centred = (g - g.mean(1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = (g.std(1, keepdim=True) if k > 1 else torch.zeros_like(g[:, :1])).expand_as(g).reshape(-1)
    elif scale == "batch":
        std = rewards.std() if len(rewards) > 1 else torch.zeros(())
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}; use group, batch or none")
    return centred / (std + eps)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): each completion's baseline is the mean reward of the
    other k - 1 completions of its prompt, r_i - (sum_j r_j - r_i) / (k - 1), which equals k / (k - 1) times
    the group-centred reward. Not scaled by any standard deviation."""
    if k < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (num_generations >= 2)")
    g = _groups(rewards, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, eps: float = 1e-8, all_reduce=None) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262) for one reward per completion: a global baseline, the mean of
    the whole batch (every process's, with `all_reduce`, a sum over processes), and normalisation by the
    batch's standard deviation, instead of per-prompt statistics, which the paper argues over-fit easy
    prompts and reward hacking. No per-prompt baseline: a prompt's difficulty is not cancelled."""
    return masked_whiten(rewards[:, None], torch.ones_like(rewards[:, None]), eps, all_reduce)[:, 0]


ADVANTAGES = {  # advantage_estimator -> f(rewards, k, scale, all_reduce)
    "grpo": lambda r, k, scale, all_reduce: group_advantages(r, k, scale),
    "rloo": lambda r, k, scale, all_reduce: rloo_advantages(r, k),
    "reinforce_pp": lambda r, k, scale, all_reduce: reinforce_pp_advantages(r, all_reduce=all_reduce),
}


def advantages_for(estimator: str, rewards: torch.Tensor, k: int, scale: str = "group", all_reduce=None):
    """The advantage of each completion under `estimator` (grpo, rloo or reinforce_pp)."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; use grpo, rloo or reinforce_pp")
    return ADVANTAGES[estimator](rewards, k, scale, all_reduce)


def informative_groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[n_prompts] bool: groups whose rewards are not all equal. A group of equal rewards has zero advantage
    under every group baseline, so it teaches nothing; DAPO's dynamic sampling (Yu et al. 2025,
    arXiv:2503.14476, section 3.2) leaves such groups out of the update."""
    g = _groups(rewards, k)
    return (g != g[:, :1]).any(1)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13; TRL's get_soft_overlong_punishment): 0 up to
    max_length - buffer tokens, then falling linearly to -factor at max_length, -factor beyond it."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float)
    start = max_length - buffer
    ramp = (start - lengths.float()) / buffer
    penalty = torch.where(lengths <= start, torch.zeros_like(ramp), ramp.clamp(min=-1.0))
    return factor * torch.where(lengths > max_length, torch.full_like(ramp, -1.0), penalty)


def clipped_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    bias_correction_kl: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Per-token loss [B, R] of the GRPO family: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho =
    exp(logp - old_logp), A [B] the completion's advantage on each of its tokens; eps_high > eps_low is DAPO's
    clip-higher (arXiv:2503.14476, section 3.1). With beta > 0, + beta k3(ref || policy) per token
    (http://joschu.net/blog/kl-approx.html), as GRPO puts the KL in the loss, not the reward; with
    `bias_correction_kl` the k3 term is weighted by rho, as TRL's GRPOTrainer does by default
    (use_bias_correction_kl). Aggregate with `loss_weights`."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    clipped = ratio.clamp(1 - epsilon_low, 1 + eps_high)
    loss = -torch.minimum(ratio * a, clipped * a)
    kl = None
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = kl_per_token(logp, ref_logp, "k3")
        loss = loss + beta * (kl * ratio if bias_correction_kl else kl)
    with torch.no_grad():
        stats = {
            "clip_low": ((ratio < 1 - epsilon_low) & (a < 0)),  # the ratio was clipped where it counts
            "clip_high": ((ratio > 1 + eps_high) & (a > 0)),
            "ratio": ratio,
            "kl": kl.detach() if kl is not None else None,
        }
    return loss, stats


def loss_weights(
    mask: torch.Tensor, loss_type: str, sequences: int, tokens: float, max_length: int | None = None
) -> torch.Tensor:
    """Weights [B, R] such that sum(weights * per_token_loss) over every micro-batch of a minibatch is the
    minibatch's loss; `sequences` and `tokens` are the minibatch's completions and response tokens (for `dapo`,
    the tokens of every process's minibatch, times the process count, since gradients are averaged over
    processes). The aggregations RL users choose between, as TRL's GRPOConfig names them:
      grpo     mean over a completion's tokens, then over completions (DeepSeekMath; favours short right
               answers and long wrong ones: Liu et al. 2025 and Yu et al. 2025);
      bnpo     mean over every token of this process's minibatch;
      dapo     mean over every token of the global minibatch (DAPO's token-level loss; TRL's default);
      dr_grpo  sum over tokens divided by completions x max_completion_length, a constant (Dr. GRPO)."""
    mask = mask.float()
    if loss_type not in LOSS_NORMALISERS:
        raise ValueError(f"unknown loss_type {loss_type!r}; use grpo, bnpo, dapo or dr_grpo")
    return LOSS_NORMALISERS[loss_type](mask, sequences, tokens, max_length)


def _per_completion(mask, sequences, tokens, max_length):
    return mask / mask.sum(1, keepdim=True).clamp(min=1) / sequences


def _per_token(mask, sequences, tokens, max_length):
    return mask / max(float(tokens), 1.0)


def _constant(mask, sequences, tokens, max_length):
    if not max_length:
        raise ValueError("dr_grpo needs max_completion_length")
    return mask / (sequences * max_length)


LOSS_NORMALISERS = {"grpo": _per_completion, "bnpo": _per_token, "dapo": _per_token, "dr_grpo": _constant}
