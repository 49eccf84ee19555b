"""PPO's update on the shared engine (finetune.rl.engine): a value adapter and head, per-token KL in the
reward, GAE, clipped policy and value losses. The design and its sources: docs/ppo.md."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from finetune.core import distributed
from finetune.recipe import PpoAlgorithm

from . import functional as F
from .engine import POLICY, REFERENCE, VALUE, MultiAdapterModel, RolloutEngine, Sequences


@dataclass
class Rollout(Sequences):
    logp: torch.Tensor = None  # [B, R] policy log-probs at sampling time (re-scored, not from generate)
    ref_logp: torch.Tensor = None
    values: torch.Tensor = None
    score: torch.Tensor = None  # [B] shaped score (normalised, EOS penalty, clip)
    kl: torch.Tensor = None  # [B, R] per-token KL estimate, masked
    rewards: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None
    entropy: float = 0.0


class PPOEngine(RolloutEngine):
    """Rollout -> score -> GAE -> clipped PPO epochs, for one batch of prompts per process.

    `score_fn(rollout_ids, mask, prompt_width, responses, resp_mask, has_stop, rows)` returns the raw
    sequence scores [B] and a dict of figures to log (`rows`: the data rows of the batch's prompts, as
    passed to `step`); the engine shapes them. `settings` is the recipe's `ppo` section (or any
    PpoAlgorithm); `total_updates` sizes the learning-rate schedule.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = self.s.kl_coef  # the KL coefficient in use: the adaptive controller moves it

    @staticmethod
    def trained(model: MultiAdapterModel, settings: PpoAlgorithm) -> dict:
        """The policy and the value adapter, each with its own learning rate."""
        return {
            "policy": (model.policy_parameters(), settings.learning_rate),
            "value": (model.value_parameters(), settings.value_learning_rate),
        }

    @staticmethod
    def response_length_of(settings: PpoAlgorithm) -> int:
        return settings.response_length

    @property
    def value_opt(self):
        return self.optimizers["value"]

    @torch.no_grad()
    def score_rollout(self, prompt_ids, prompt_mask, responses, rows=None) -> tuple[Rollout, dict]:
        """Truncate at the stop token, re-score with one forward per adapter, shape the score, KL,
        rewards and GAE."""
        s, m = self.s, self.model
        seq = self.truncate(prompt_ids, prompt_mask, responses)
        logps = self.rescore(seq, (POLICY, REFERENCE), entropy=True)
        logp, ref, entropy = logps[POLICY], logps[REFERENCE], logps["entropy"]
        values = []
        for i in range(0, len(seq.ids), self.micro):
            with m.active(VALUE):
                values.append(m.values(seq.ids[i : i + self.micro], seq.mask[i : i + self.micro], seq.prompt_width))
        values = torch.cat(values)
        resp_mask, end, has_stop = seq.resp_mask, seq.end, seq.has_stop
        raw, info = self.score_fn(seq.ids, seq.mask, seq.prompt_width, seq.responses, resp_mask, has_stop, rows)
        score = F.shape_score(raw.to(logp.device).float(), has_stop, s.missing_eos_penalty, clip=s.score_clip)
        kl = F.kl_per_token(logp, ref, s.kl_estimator) * resp_mask
        rewards = F.token_rewards(score, kl, resp_mask, end, self.beta)
        values = values * resp_mask
        advantages, returns = F.gae(rewards, values, resp_mask, s.gamma, s.lam)
        advantages = F.masked_whiten(advantages, resp_mask, all_reduce=self._all_reduce_sum)
        rollout = Rollout(
            **vars(seq),
            logp=logp,
            ref_logp=ref,
            values=values,
            score=score,
            kl=kl,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            entropy=F.masked_mean(entropy, resp_mask).item(),
        )
        stats = {
            "score": info.pop("score", score.mean().item()),
            "score_shaped": score.mean().item(),
            "kl": kl.sum(1).mean().item(),
            "non_score_reward": (-self.beta * kl.sum(1)).mean().item(),
            "eos_rate": has_stop.float().mean().item(),
            "response_length": resp_mask.sum(1).mean().item(),
            "entropy": rollout.entropy,
            "value_mean": F.masked_mean(values, resp_mask).item(),
            **info,
        }
        stats["rlhf_reward"] = stats["score_shaped"] + stats["non_score_reward"]
        return rollout, stats

    def micro_step(self, ro: Rollout, micro: torch.Tensor, weight) -> dict:
        """Policy pass then value pass on rows `micro` of a rollout, each loss scaled by `weight` (this
        micro-batch's share of the minibatch's tokens) and back-propagated inside its adapter's block."""
        s, m = self.s, self.model
        with m.active(POLICY, grad=True):
            logp, _ = m.logprobs(
                ro.ids[micro],
                ro.mask[micro],
                ro.prompt_width,
                s.temperature,
                response_only=self.fast.response_only_logits,
            )
            pg, pg_stats = F.policy_loss(logp, ro.logp[micro], ro.advantages[micro], ro.resp_mask[micro], s.clip_range)
            self._backward(pg * weight)
        with m.active(VALUE, grad=True):
            v = m.values(ro.ids[micro], ro.mask[micro], ro.prompt_width)
            vl, v_stats = F.value_loss(v, ro.values[micro], ro.returns[micro], ro.resp_mask[micro], s.clip_range_value)
            self._backward(vl * s.vf_coef * weight)
        return {"policy_loss": pg.item(), "value_loss": vl.item(), **pg_stats, **v_stats}

    def optimise(self, ro: Rollout) -> dict:
        """K epochs x minibatches; per micro-batch the policy pass (backward) then the value pass
        (backward), never switching adapters between a forward and its backward."""
        s, m = self.s, self.model
        B = len(ro.ids)
        if B % s.mini_batches:
            raise ValueError(f"rollout batch {B} is not divisible into {s.mini_batches} minibatches")
        size = B // s.mini_batches
        m.peft.train()
        logs: dict[str, list[float]] = {}
        for _ in range(s.ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle).to(ro.ids.device)
            for k in range(s.mini_batches):
                idx = order[k * size : (k + 1) * size]
                tokens = ro.resp_mask[idx].sum().clamp(min=1)
                for micro in idx.split(s.micro_batch_size):
                    for key, value in self.micro_step(ro, micro, ro.resp_mask[micro].sum() / tokens).items():
                        logs.setdefault(key, []).append(value)
                for key, value in self._step().items():
                    logs.setdefault(key, []).append(value)
        self._schedule()
        m.peft.eval()
        return {k: sum(v) / len(v) for k, v in logs.items()}

    def step(self, prompt_ids, prompt_mask, rows: list[dict] | None = None) -> dict:
        """One PPO update on this process's prompts (`rows`: their data rows, for the score function);
        returns figures averaged over processes."""
        t0 = time.perf_counter()
        responses = self.generate(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        rollout, stats = self.score_rollout(prompt_ids, prompt_mask, responses, rows)
        t2 = time.perf_counter()
        stats.update(self.optimise(rollout))
        t3 = time.perf_counter()
        timings = {"time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_optimise_s": t3 - t2}
        stats.update(timings)
        stats["beta"] = self.beta
        stats = distributed.all_mean(stats, self.device)
        if self.s.adaptive_kl:
            episodes = len(prompt_ids) * distributed.world_size()
            self.beta = F.adaptive_kl_beta(self.beta, stats["kl"], self.s.kl_target, self.s.kl_horizon, episodes)
        self.last_rollout = rollout
        return stats

    # ---- state (checkpoints)
    def extra_state(self) -> dict:
        return {"beta": self.beta}

    def load_extra_state(self, state: dict) -> None:
        self.beta = state["beta"]
