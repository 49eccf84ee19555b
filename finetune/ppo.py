"""PPO stage: RLHF with a learned (and/or rule-based) reward; LoRA policy, value and reward on one base.

    accelerate launch finetune/ppo.py RECIPE [key=value ...]
    finetune ppo RECIPE [key=value ...]

The run (prompts, the one-base model, resume, the update loop, held-out figures, output) is what every RL
stage shares, finetune.rl.stage.run; this module adds PPO's engine (finetune.rl.ppo_engine: value adapter,
GAE, clipped policy and value losses), its figures and its summary. Why the engine is ours and where it
departs from the usual recipe: docs/ppo.md.
"""

from __future__ import annotations

import logging
import sys

from finetune.core.summary import figure, print_summary, rate
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError
from finetune.rl import stage as rl
from finetune.rl.ppo_engine import PPOEngine

log = logging.getLogger("finetune.ppo")

STAGE = "ppo"


def ppo_figures(stats: dict) -> dict:
    """What a PPO step line shows, in the order of the other stages' lines: losses, lr, then PPO's figures."""
    return {
        "loss": stats["policy_loss"],
        "value loss": stats["value_loss"],
        "lr": f"{stats['lr']:.2e}",
        "score": stats["score"],
        "kl": stats["kl"],
        "len": stats["response_length"],
        "eos": stats["eos_rate"],
        "clipfrac": stats["clipfrac"],
    }


def summarise(metrics: dict, engine: PPOEngine, recipe: Recipe, replies: list[str] | None, out) -> None:
    earlier = ", ".join(
        f"{k.split('_')[-1].upper()} {rate(v)}" for k, v in rl.earlier_correctness(recipe, STAGE).items()
    )
    m = metrics
    print_summary(
        STAGES["ppo"].summary_title,
        [
            ("score (first -> last 10%)", f"{m['score_start']:.3f} -> {m['score_end']:.3f}"),
            *(
                [("learned reward (raw)", f"{m['score_learned_raw_start']:.3f} -> {m['score_learned_raw_end']:.3f}")]
                if m["score_learned_raw_start"] is not None
                else []
            ),
            *rl.term_lines(m),
            ("KL at the end", f"{m['kl_end']:.3f} nats/response (beta {engine.beta:.3g})"),
            ("EOS rate at the end", rate(m["eos_rate_end"])),
            *(
                [
                    (
                        f"held-out ({m['eval_prompts']} prompts)",
                        f"reward {figure(m['eval_score_before'])} -> {figure(m['eval_score_after'])}, "
                        f"KL {figure(m['eval_kl_after'])}, EOS {rate(m['eval_eos_rate_before'])} -> "
                        f"{rate(m['eval_eos_rate_after'])}, length {m['eval_response_length_before']:.1f} -> "
                        f"{m['eval_response_length_after']:.1f}",
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
                f"{m['updates']} x {recipe.ppo.rollout_batch_size * m['processes']} episodes, "
                f"{m['train_runtime_s']:.1f}s ({rate(m['generation_share'])} generating), "
                f"peak memory {m['peak_memory_mb']:.0f} MB",
            ),
            ("base unchanged", str(m["base_unchanged"])),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("output", str(out)),
        ],
    )


def check_settings(recipe: Recipe, main: bool) -> None:
    """What the ppo section's values must satisfy together, before anything loads."""
    s = recipe.ppo
    if s.use_vllm:
        from finetune.rl.vllm_rollout import check_available

        check_available(recipe, STAGE)
    if s.rollout_batch_size % s.mini_batches:
        raise RecipeError(
            f"{recipe.source}: ppo.mini_batches: {s.mini_batches} does not divide "
            f"ppo.rollout_batch_size {s.rollout_batch_size}"
        )


def own_metrics(history: list[dict], engine: PPOEngine) -> dict:
    """PPO's headline figures from its update log: the score and KL over the first and last 10% of updates."""
    return {
        "score_start": rl.window_mean(history, "score", last=False),
        "score_end": rl.window_mean(history, "score", last=True),
        "kl_end": rl.window_mean(history, "kl", last=True),
        "beta_end": engine.beta,
    }


def run(recipe: Recipe) -> dict:
    parts = rl.StageParts(
        value_init=recipe.ppo.value_init,
        engine=PPOEngine,
        figures=ppo_figures,
        bar={"score": "score", "kl": "kl"},
        own_metrics=own_metrics,
        summarise=summarise,
        check_settings=check_settings,
    )
    return rl.run(recipe, STAGE, parts)


def main(argv: list[str] | None = None) -> int:
    return stage_main("ppo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
