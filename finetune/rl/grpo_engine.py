"""GRPO and its critic-free relatives on the shared engine (finetune.rl.engine): k completions per prompt, one
scalar reward each, a group (or leave-one-out, or batch) baseline instead of a value model, the clipped ratio
with DAPO's clip-higher, the k3 KL term in the loss, and the loss aggregations of TRL's GRPOConfig.

Why not TRL's GRPOTrainer, which has all of this: it takes a reward model as a second, separate model (a full
copy of the weights; bench/run.py --stage grpo measures what that costs), and it has no way to start the
policy from a trained adapter whose frozen copy is the reference while the reward adapter scores on the same
base. Here the policy, the reference (adapters disabled, or a frozen copy of the start adapter) and the
learned reward (the reward stage's adapter and head) share one base in memory. The arithmetic is in
finetune.rl.functional, each piece tested against a reference loop; docs/grpo.md puts it together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from finetune.core import distributed
from finetune.recipe import GrpoAlgorithm

from . import functional as F
from .engine import POLICY, REFERENCE, RolloutEngine, Sequences


@dataclass
class GroupRollout(Sequences):
    old_logp: torch.Tensor | None = None  # [B, R] when the update is not purely on-policy (several passes/steps)
    ref_logp: torch.Tensor | None = None  # [B, R] when beta > 0
    rewards: torch.Tensor = None  # [B] the reward of each completion (rule + learned, + overlong penalty)
    advantages: torch.Tensor = None  # [B]
    loss_mask: torch.Tensor = None  # [B, R] the tokens that count in the loss
    kept: torch.Tensor = None  # [B] bool: in a group that takes part in the update (dynamic sampling)


class GRPOEngine(RolloutEngine):
    """Rollout of k completions per prompt -> rewards -> advantages -> clipped-ratio passes over the rollout.

    `score_fn` is the PPO engine's: `(ids, mask, prompt_width, responses, resp_mask, has_stop, rows)` -> (raw
    rewards [B], figures). `settings` is the recipe's `grpo` section (or any GrpoAlgorithm)."""

    @staticmethod
    def response_length_of(settings: GrpoAlgorithm) -> int:
        return settings.max_completion_length

    @property
    def k(self) -> int:
        """Completions per prompt (the group size)."""
        return self.s.num_generations

    @property
    def on_policy(self) -> bool:
        """One pass, one optimiser step: the ratio is exp(logp - logp.detach()) = 1 and the sampling-time
        log-probs are not needed (TRL skips them the same way)."""
        return self.s.num_iterations == 1 and self.s.mini_batches == 1

    @torch.no_grad()
    def score_groups(self, prompt_ids, prompt_mask, responses, rows=None) -> tuple[GroupRollout, dict]:
        """Truncate, re-score what the update needs (old log-probs off-policy, the reference when beta > 0),
        reward, advantages; prompt i's completions are rows i*k .. i*k + k - 1."""
        s = self.s
        seq = self.truncate(prompt_ids, prompt_mask, responses)
        adapters = (() if self.on_policy else (POLICY,)) + ((REFERENCE,) if s.beta > 0 else ())
        logps = self.rescore(seq, adapters, entropy=not self.on_policy) if adapters else {}
        raw, info = self.score_fn(seq.ids, seq.mask, seq.prompt_width, seq.responses, seq.resp_mask, seq.has_stop, rows)
        rewards = raw.to(self.device).float()
        lengths = seq.resp_mask.sum(1)
        if s.overlong_buffer:
            penalty = F.overlong_penalty(lengths, s.max_completion_length, s.overlong_buffer, s.overlong_penalty_factor)
            rewards = rewards + penalty
            info["overlong_penalty"] = penalty.mean().item()
        advantages = F.advantages_for(
            s.advantage_estimator, rewards, self.k, s.scale_rewards, all_reduce=self._all_reduce_sum
        )
        informative = F.informative_groups(rewards, self.k)
        kept = informative.repeat_interleave(self.k) if s.dynamic_sampling else torch.ones_like(seq.has_stop)
        loss_mask = seq.resp_mask * kept[:, None]
        if s.mask_truncated_completions:
            loss_mask = loss_mask * seq.has_stop[:, None]
        rollout = GroupRollout(
            **vars(seq),
            old_logp=logps.get(POLICY),
            ref_logp=logps.get(REFERENCE),
            rewards=rewards,
            advantages=advantages,
            loss_mask=loss_mask,
            kept=kept,
        )
        info.pop("score", None)
        groups = rewards.view(-1, self.k)
        stats = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": 1.0 - informative.float().mean().item(),
            "group_reward_std": groups.std(1).mean().item(),
            "eos_rate": seq.has_stop.float().mean().item(),
            "response_length": lengths.float().mean().item(),
            "advantage_abs": advantages.abs().mean().item(),
            **({"entropy": F.masked_mean(logps["entropy"], seq.resp_mask).item()} if "entropy" in logps else {}),
            **info,
        }
        return rollout, stats

    def micro_step(self, ro: GroupRollout, micro: torch.Tensor, sequences: int, tokens: float) -> dict:
        """The policy's forward and backward on rows `micro`, its loss weighted so that the micro-batches of a
        minibatch add up to the minibatch's loss (functional.loss_weights)."""
        s, m = self.s, self.model
        with m.active(POLICY, grad=True):
            logp, entropy = m.logprobs(
                ro.ids[micro],
                ro.mask[micro],
                ro.prompt_width,
                self.temperature,
                entropy=True,
                response_only=self.fast.response_only_logits,
            )
            old = ro.old_logp[micro] if ro.old_logp is not None else logp.detach()
            ref = ro.ref_logp[micro] if ro.ref_logp is not None else None
            loss, st = F.clipped_token_loss(
                logp, old, ro.advantages[micro], s.epsilon, s.epsilon_high, ref, s.beta, s.use_bias_correction_kl
            )
            mask = ro.loss_mask[micro]
            weights = F.loss_weights(mask, s.loss_type, sequences, tokens, s.max_completion_length)
            total = (weights * loss).sum()
            self._backward(total)
        resp = ro.resp_mask[micro]
        with torch.no_grad():
            out = {
                "policy_loss": total.item(),
                "clip_ratio_low": F.masked_mean(st["clip_low"].float(), mask).item(),
                "clip_ratio_high": F.masked_mean(st["clip_high"].float(), mask).item(),
                "ratio_mean": F.masked_mean(st["ratio"], mask).item(),
                "entropy_train": F.masked_mean(entropy, resp).item(),
            }
            if st["kl"] is not None:
                out["kl"] = (st["kl"] * resp).sum(1).mean().item()  # k3, nats per completion
        return out

    def optimise(self, ro: GroupRollout) -> dict:
        """num_iterations passes; each shuffles the completions into `mini_batches` optimiser steps of
        micro-batches, each micro-batch's backward inside the policy adapter's block."""
        s, m = self.s, self.model
        B = len(ro.ids)
        if B % s.mini_batches:
            raise ValueError(f"{B} completions are not divisible into {s.mini_batches} minibatches")
        size = B // s.mini_batches
        m.peft.train()
        logs: dict[str, list[float]] = {}
        world = distributed.world_size()
        for _ in range(s.num_iterations):
            order = torch.randperm(B, generator=self.shuffle).to(ro.ids.device)
            for j in range(s.mini_batches):
                idx = order[j * size : (j + 1) * size]
                sequences = max(int(ro.kept[idx].sum()), 1)
                tokens = ro.loss_mask[idx].sum()
                if s.loss_type == "dapo":  # every process's tokens; x world: gradients are averaged over processes
                    tokens = self._all_reduce_sum(tokens) / world
                for micro in idx.split(self.micro):
                    for key, value in self.micro_step(ro, micro, sequences, float(tokens)).items():
                        logs.setdefault(key, []).append(value)
                for key, value in self._step().items():
                    logs.setdefault(key, []).append(value)
        self._schedule()
        m.peft.eval()
        return {k: sum(v) / len(v) for k, v in logs.items()}

    def step(self, prompt_ids, prompt_mask, rows: list[dict] | None = None) -> dict:
        """One update on this process's prompts, each answered k times (`rows`: the prompts' data rows, for
        the reward function); returns figures averaged over processes."""
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(self.k, 0), prompt_mask.repeat_interleave(self.k, 0)
        rows = [r for r in rows for _ in range(self.k)] if rows is not None else None
        t0 = time.perf_counter()
        responses = self.generate(prompt_ids, prompt_mask)
        t1 = time.perf_counter()
        rollout, stats = self.score_groups(prompt_ids, prompt_mask, responses, rows)
        t2 = time.perf_counter()
        stats.update(self.optimise(rollout))
        t3 = time.perf_counter()
        stats.update({"time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_optimise_s": t3 - t2})
        self.last_rollout = rollout
        return distributed.all_mean(stats, self.device)
