"""Reward-model stage: a LoRA sequence-classification head on the SFT model, trained on preference pairs.

    accelerate launch finetune/reward.py RECIPE [key=value ...]
    finetune reward RECIPE [key=value ...]

load recipe -> pairs -> SFT-merged base + score head + LoRA -> accuracy before -> train (TRL
RewardTrainer) -> accuracy after -> save (adapter + score head) -> summary.
"""

from __future__ import annotations

import logging
import sys

from finetune.core.evaluation import pairwise_accuracy
from finetune.core.modeling import add_lora, count_parameters, load_model
from finetune.core.outputs import save_stage
from finetune.core.progress import progress
from finetune.core.summary import print_summary
from finetune.core.training import place_for_eval, prepare_preference_stage, train
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe

log = logging.getLogger("finetune.reward")


def run(recipe: Recipe) -> dict:
    from trl import RewardConfig, RewardTrainer

    setup = prepare_preference_stage(recipe, "reward", RewardConfig)
    start, tokenizer, args, pairs = setup.start, setup.tokenizer, setup.args, setup.pairs

    # RewardTrainer takes full sequences (prompt + reply through its end-of-turn token) as
    # chosen_ids / rejected_ids and, seeing them already tokenized, does not tokenize again.
    as_reward = {
        name: ds.map(
            lambda r: {
                "chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
            },
            remove_columns=["prompt_ids"],
        )
        for name, ds in pairs.items()
    }

    model = load_model(recipe, task="seq_cls", merge=start, num_labels=1)
    model = add_lora(model, recipe, task="seq_cls")  # PEFT saves the score head with the adapter
    trainable, total = count_parameters(model)
    log.info("LoRA + score head: %d trainable of %d parameters", trainable, total)

    with progress("reward: setting up the trainer"):
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=as_reward["train"],
            eval_dataset=as_reward["eval"],
            processing_class=tokenizer,
        )
    pad = tokenizer.pad_token_id
    place_for_eval(model, args, recipe)
    before = pairwise_accuracy(model, pairs["eval"], pad, args.per_device_eval_batch_size)
    trained = train(trainer, model, recipe, "reward", setup.checkpoint)
    after = pairwise_accuracy(model, pairs["eval"], pad, args.per_device_eval_batch_size)

    metrics = {
        "eval_accuracy_before": before["accuracy"],
        "eval_accuracy": after["accuracy"],
        "eval_margin_before": before["margin"],
        "eval_margin": after["margin"],
        **trained,
        **setup.data_metrics(),
    }
    out = save_stage(trainer, recipe, "reward", tokenizer, metrics, reports=setup.reports)
    if setup.main_process:
        print_summary(
            STAGES["reward"].summary_title,
            [
                ("held-out pair accuracy", f"{before['accuracy']:.0%} -> {after['accuracy']:.0%}"),
                ("mean margin", f"{before['margin']:.3f} -> {after['margin']:.3f}"),
                (
                    "trained",
                    f"{metrics['global_steps']} steps on {len(pairs['train'])} pairs, "
                    f"{metrics['train_runtime_s']:.1f}s",
                ),
                ("data", setup.data_summary()),
                ("started from", ", ".join(start) or "the base"),
                ("output", str(out)),
            ],
        )
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("reward", run, argv)


if __name__ == "__main__":
    sys.exit(main())
