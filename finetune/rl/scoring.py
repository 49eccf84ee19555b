"""The RL stages' sequence score: a weighted sum of rule functions (finetune.rl.rules) and/or the learned
reward model (an adapter + head on the shared base), as the stage's `rewards` list
(finetune.recipe.sections.RlRewards) names them."""

from __future__ import annotations

import logging
import time

import torch

from finetune.core import distributed

from .engine import REWARD, MultiAdapterModel
from .functional import reward_readout_index
from .rules import RewardFunctionError, RuleReward

log = logging.getLogger(__name__)


class Scorer:
    """The sequence score: sum over terms of weight x term, the learned reward normalised with the start
    policy's statistics. Called by the engine with the batch's data rows; logs every term's mean
    (`reward_<label>`, unweighted) and the seconds spent in the reward model and in the rule functions."""

    def __init__(
        self,
        model: MultiAdapterModel,
        rules: list[RuleReward],
        tokenizer,
        pad_id: int,
        normalize: bool,
        micro: int,
        learned_weight: float | None = 1.0,
        response_limit: int | None = None,
    ):
        self.model, self.rules, self.learned_weight = model, rules, learned_weight
        self.tokenizer, self.pad_id, self.normalize, self.micro = tokenizer, pad_id, normalize, micro
        self.response_limit = response_limit
        self.special_tokens = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()))
        self.norm: dict | None = None  # {"mean", "std"} of the learned reward, fixed from the first rollout

    def terms(self) -> list[dict]:
        """The reward's terms as metrics.json records them (`term` is the label of its reward_<term> figures)."""
        learned = [{"term": "learned", "weight": self.learned_weight}] if self.learned_weight is not None else []
        if self.model.reward_head is None:
            learned = []
        rules = [{"term": r.label, "function": r.spec, "weight": r.weight, "kwargs": r.kwargs} for r in self.rules]
        return learned + rules

    @torch.no_grad()
    def __call__(self, ids, mask, prompt_width, responses, resp_mask, has_stop, rows):
        total = torch.zeros(len(ids), device=ids.device)
        info = {}
        if self.model.reward_head is not None and self.learned_weight is not None:
            started = time.perf_counter()
            raw = self.learned(ids, mask)
            if self.normalize and self.norm is None:
                stats = distributed.all_mean({"m": raw.mean().item(), "m2": (raw**2).mean().item()}, ids.device)
                self.norm = {"mean": stats["m"], "std": max(stats["m2"] - stats["m"] ** 2, 0.0) ** 0.5 or 1.0}
                log.info(
                    "learned reward on the start policy's samples: mean %.4f std %.4f (used to normalise)",
                    self.norm["mean"],
                    self.norm["std"],
                )
            learned = (raw - self.norm["mean"]) / self.norm["std"] if self.normalize else raw
            total += self.learned_weight * learned
            info["score_learned_raw"] = raw.mean().item()
            info["reward_learned"] = learned.mean().item()
            info["time_reward_model_s"] = time.perf_counter() - started
        if self.rules:
            started = time.perf_counter()
            values = self.rule_values(responses, resp_mask, has_stop, rows, ids.device)
            rule_total = torch.zeros(len(ids), device=ids.device)
            for rule, v in zip(self.rules, values):
                rule_total += rule.weight * v
                info[f"reward_{rule.label}"] = v.mean().item()
            total += rule_total
            info["score_rule"] = rule_total.mean().item()
            info["time_reward_functions_s"] = time.perf_counter() - started
        info["score"] = total.mean().item()
        return total, info

    def rule_values(self, responses, resp_mask, has_stop, rows, device) -> list[torch.Tensor]:
        """Each rule's value on each response. A failure on one process stops every process (they would
        otherwise wait for it at the next all-reduce): the failing one raises its message, the others say so."""
        texts = self.decode(responses, resp_mask, has_stop)
        values, failure = [], None
        try:
            for rule in self.rules:
                values.append(
                    torch.tensor(
                        [
                            rule(
                                row["prompt"][-1]["content"],
                                text,
                                row.get("example", {}),
                                {
                                    "stopped": bool(stop),
                                    "response_tokens": int(n),
                                    "response_limit": self.response_limit or responses.shape[1],
                                    "special_tokens": self.special_tokens,
                                },
                                row.get("where", "a prompt row"),
                            )
                            for row, text, stop, n in zip(rows, texts, has_stop.tolist(), resp_mask.sum(1).tolist())
                        ],
                        device=device,
                    )
                )
        except RewardFunctionError as e:
            failure = e
        if distributed.world_size() > 1:
            failed = torch.tensor([float(failure is not None)], device=device)
            distributed.all_sum_(failed)
            if failed.item() and failure is None:
                raise RewardFunctionError("a reward function failed on another process (its message is in its log)")
        if failure is not None:
            raise failure
        return values

    def learned(self, ids, mask) -> torch.Tensor:
        """The reward model's raw score of each sequence, read where it was trained to read."""
        index = reward_readout_index(ids, mask, self.pad_id)
        with self.model.active(REWARD):
            return torch.cat(
                [
                    self.model.reward(ids[i : i + self.micro], mask[i : i + self.micro], index[i : i + self.micro])
                    for i in range(0, len(ids), self.micro)
                ]
            )

    def decode(self, responses, resp_mask, has_stop) -> list[str]:
        """The replies as rule functions see them: the text before the end-of-turn token (which ended the
        turn, so it is not part of the reply), special tokens kept, surrounding space stripped."""
        return [
            self.tokenizer.decode(r[: int(m.sum()) - int(stop)], skip_special_tokens=False).strip()
            for r, m, stop in zip(responses.tolist(), resp_mask, has_stop.tolist())
        ]
