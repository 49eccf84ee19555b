"""The RL stages' sequence score: the learned reward model (an adapter + head on the shared base) and/or a
rule-based reward function named in the recipe."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys

import torch

from finetune.core import distributed
from finetune.recipe import Recipe, RecipeError

from .engine import REWARD, MultiAdapterModel
from .functional import reward_readout_index

log = logging.getLogger(__name__)


def load_reward_function(spec: str | None, recipe: Recipe, stage: str = "ppo"):
    """`module:function` -> callable(prompt, response, example) -> float. The module is imported and
    runs with the user's permissions, like any Python the recipe names: only name code you trust."""
    if not spec:
        return None
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise RecipeError(
            f"{recipe.source}: {stage}.reward_function: {spec!r} must look like module:function "
            "(e.g. my_rewards:exact_match)"
        )
    if module_name == "finetune.rewards":  # moved with the rl package
        raise RecipeError(
            f"{recipe.source}: {stage}.reward_function: finetune.rewards moved to finetune.rl.rewards; write "
            f"finetune.rl.rewards:{name}"
        )
    if str(recipe.base_dir) not in sys.path:
        sys.path.insert(0, str(recipe.base_dir))
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise RecipeError(
            f"{recipe.source}: {stage}.reward_function: cannot load {spec!r} ({e}); the module must be "
            "importable (installed, or a .py file beside the recipe)"
        ) from None
    takes_example = len(inspect.signature(fn).parameters) >= 3
    return (lambda p, r, ex: float(fn(p, r, ex))) if takes_example else (lambda p, r, ex: float(fn(p, r)))


class Scorer:
    """The sequence score: learned reward (normalised with the start policy's statistics) plus the
    weighted rule-based reward. Called by the engine with the batch's data rows."""

    def __init__(
        self, model: MultiAdapterModel, rule, rule_weight: float, tokenizer, pad_id: int, normalize: bool, micro: int
    ):
        self.model, self.rule, self.rule_weight = model, rule, rule_weight
        self.tokenizer, self.pad_id, self.normalize, self.micro = tokenizer, pad_id, normalize, micro
        self.norm: dict | None = None  # {"mean", "std"} of the learned reward, fixed from the first rollout

    @torch.no_grad()
    def __call__(self, ids, mask, prompt_width, responses, resp_mask, has_stop, rows):
        total = torch.zeros(len(ids), device=ids.device)
        info = {}
        if self.model.reward_head is not None:
            raw = self.learned(ids, mask)
            if self.normalize and self.norm is None:
                stats = distributed.all_mean({"m": raw.mean().item(), "m2": (raw**2).mean().item()}, ids.device)
                self.norm = {"mean": stats["m"], "std": max(stats["m2"] - stats["m"] ** 2, 0.0) ** 0.5 or 1.0}
                log.info(
                    "learned reward on the start policy's samples: mean %.4f std %.4f (used to normalise)",
                    self.norm["mean"],
                    self.norm["std"],
                )
            total += (raw - self.norm["mean"]) / self.norm["std"] if self.normalize else raw
            info["score_learned_raw"] = raw.mean().item()
        if self.rule is not None:
            rule = torch.tensor(
                [
                    self.rule(row["prompt"][-1]["content"], text, row.get("example", {}))
                    for row, text in zip(rows, self.decode(responses, resp_mask))
                ],
                device=ids.device,
            )
            total += self.rule_weight * rule
            info["score_rule"] = rule.mean().item()
        info["score"] = total.mean().item()
        return total, info

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

    def decode(self, responses, resp_mask) -> list[str]:
        return [
            self.tokenizer.decode(r[: int(m.sum())], skip_special_tokens=True).strip()
            for r, m in zip(responses.tolist(), resp_mask)
        ]
