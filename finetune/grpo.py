"""GRPO stage: critic-free RL (GRPO, Dr. GRPO, DAPO's loss, RLOO, REINFORCE++) with rule rewards and/or the
learned reward; a LoRA policy and the reward adapter on one frozen base.

    accelerate launch finetune/grpo.py RECIPE [key=value ...]
    finetune grpo RECIPE [key=value ...]

The run (prompts, the one-base model, resume, the update loop, held-out figures, output) is what every RL
stage shares, finetune.rl.stage.run; this module adds the GRPO engine (finetune.rl.grpo_engine: k completions
per prompt, group baselines, no value model), its figures and its summary. Why not TRL's GRPOTrainer, the
loss variants and when to pick each: docs/grpo.md.
"""

from __future__ import annotations

import logging
import sys

from finetune.core.summary import figure, print_summary, rate
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError
from finetune.rl import stage as rl
from finetune.rl.grpo_engine import GRPOEngine

log = logging.getLogger("finetune.grpo")

STAGE = "grpo"


def grpo_figures(stats: dict) -> dict:
    """What a GRPO step line shows, in the order of the other stages' lines: loss, lr, then GRPO's figures."""
    out = {"loss": stats["policy_loss"], "lr": f"{stats['lr']:.2e}", "reward": stats["reward"]}
    if "kl" in stats:
        out["kl"] = stats["kl"]
    out.update(
        {
            "len": stats["response_length"],
            "eos": stats["eos_rate"],
            "zero-std groups": stats["frac_reward_zero_std"],
            "clip": stats["clip_ratio_low"] + stats["clip_ratio_high"],
        }
    )
    return out


def check_settings(recipe: Recipe, main: bool) -> None:
    """What the grpo section's values must satisfy together, before anything loads."""
    s = recipe.grpo
    completions = s.rollout_batch_size * s.num_generations
    if completions % s.mini_batches:
        raise RecipeError(
            f"{recipe.source}: grpo.mini_batches: {s.mini_batches} does not divide the {completions} completions of "
            f"an update (grpo.rollout_batch_size {s.rollout_batch_size} x grpo.num_generations {s.num_generations})"
        )
    if s.overlong_buffer >= s.max_completion_length:
        raise RecipeError(
            f"{recipe.source}: grpo.overlong_buffer: {s.overlong_buffer} must be below grpo.max_completion_length "
            f"{s.max_completion_length} (the penalty starts at max_completion_length - overlong_buffer tokens)"
        )
    if s.use_vllm:
        from finetune.rl.vllm_rollout import check_available

        check_available(recipe, STAGE)


def own_metrics(history: list[dict], engine: GRPOEngine) -> dict:
    """GRPO's headline figures from its update log: the reward (first and last 10% of updates), the share of
    prompts whose completions all scored the same (nothing to learn from them), KL when beta > 0."""
    return {
        "reward_start": rl.window_mean(history, "reward", last=False),
        "reward_end": rl.window_mean(history, "reward", last=True),
        "frac_reward_zero_std_start": rl.window_mean(history, "frac_reward_zero_std", last=False),
        "frac_reward_zero_std_end": rl.window_mean(history, "frac_reward_zero_std", last=True),
        "kl_end": rl.window_mean(history, "kl", last=True),
        "clip_ratio_end": (rl.window_mean(history, "clip_ratio_low", last=True) or 0.0)
        + (rl.window_mean(history, "clip_ratio_high", last=True) or 0.0),
        "loss_type": engine.s.loss_type,
        "advantage_estimator": engine.s.advantage_estimator,
        "num_generations": engine.k,
    }


def summarise(metrics: dict, engine: GRPOEngine, recipe: Recipe, replies: list[str] | None, out) -> None:
    earlier = ", ".join(
        f"{k.split('_')[-1].upper()} {rate(v)}" for k, v in rl.earlier_correctness(recipe, STAGE).items()
    )
    m, s = metrics, recipe.grpo
    parts = [
        ("reward (first -> last 10%)", f"{m['reward_start']:.3f} -> {m['reward_end']:.3f}"),
        *rl.term_lines(m),
        *(
            [("learned reward (raw)", f"{m['score_learned_raw_start']:.3f} -> {m['score_learned_raw_end']:.3f}")]
            if m["score_learned_raw_start"] is not None
            else []
        ),
        (
            "groups with one reward",
            f"{rate(m['frac_reward_zero_std_start'])} -> {rate(m['frac_reward_zero_std_end'])} (they teach nothing)",
        ),
        *(
            [("KL at the end", f"{m['kl_end']:.3f} nats/completion (beta {s.beta:g})")]
            if m["kl_end"] is not None
            else []
        ),
        ("EOS rate at the end", rate(m["eos_rate_end"])),
        *(
            [
                (
                    f"held-out ({m['eval_prompts']} prompts)",
                    f"KL {figure(m['eval_kl_after'])}, EOS {rate(m['eval_eos_rate_before'])} -> "
                    f"{rate(m['eval_eos_rate_after'])}, length {m['eval_response_length_before']:.1f} -> "
                    f"{m['eval_response_length_after']:.1f}"
                    + (
                        f", learned reward {figure(m['eval_score_before'])} -> {figure(m['eval_score_after'])}"
                        if m.get("eval_score_after") is not None
                        else ""
                    ),
                )
            ]
            if m.get("eval_kl_after") is not None
            else []
        ),
        (
            "held-out correct",
            f"{rate(m['correct_rate_before'])} -> {rate(m['correct_rate_after'])}"
            + (f" (earlier stages: {earlier})" if earlier else ""),
        ),
        (
            "updates",
            f"{m['updates']} x {s.rollout_batch_size * m['processes']} prompts x {s.num_generations} completions "
            f"({s.advantage_estimator}, loss {s.loss_type}), {m['train_runtime_s']:.1f}s "
            f"({rate(m['generation_share'])} generating), peak memory {m['peak_memory_mb']:.0f} MB",
        ),
        ("base unchanged", str(m["base_unchanged"])),
        ("sample reply", repr(replies[0]) if replies else "n/a"),
        ("output", str(out)),
    ]
    print_summary(STAGES[STAGE].summary_title, parts)


def run(recipe: Recipe) -> dict:
    parts = rl.StageParts(
        value_init=None,
        engine=GRPOEngine,
        figures=grpo_figures,
        bar={"reward": "reward", "len": "response_length"},
        own_metrics=own_metrics,
        summarise=summarise,
        check_settings=check_settings,
    )
    return rl.run(recipe, STAGE, parts)


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
