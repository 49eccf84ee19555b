"""Reward-model stage: a LoRA sequence-classification head on the SFT model, trained on preference pairs.

    accelerate launch finetune/reward.py RECIPE [key=value ...]
    finetune reward RECIPE [key=value ...]

load recipe -> pairs -> SFT-merged base + score head + LoRA -> accuracy before -> train (TRL
RewardTrainer) -> accuracy after -> save (adapter + score head) -> summary.
"""

from __future__ import annotations

import logging
import sys
import time

from finetune.data import to_preference, tokenize_preferences, train_eval_rows
from finetune.evaluation import pairwise_accuracy
from finetune.modeling import add_lora, base_fingerprint, count_parameters, load_model, load_tokenizer, template_for
from finetune.outputs import print_summary, save_stage, setup_logging
from finetune.recipe import Recipe, recipe_from_argv
from finetune.training import check_precision, check_start_adapters, resume_from, trl_config

log = logging.getLogger("finetune.reward")


def run(recipe: Recipe) -> dict:
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    section = recipe.reward
    check_precision(recipe)
    start = check_start_adapters(recipe, "reward")
    set_seed(recipe.seed)
    template = template_for(recipe)
    tokenizer = load_tokenizer(recipe)
    args = trl_config(recipe, "reward", RewardConfig, eval_strategy="no")
    main_process = args.process_index == 0
    setup_logging(main_process)

    train_rows, eval_rows, train_report, eval_report = train_eval_rows(section.data, recipe, recipe.seed,
                                                                       to_preference)
    pairs = {}
    for name, rows, report in (("train", train_rows, train_report), ("eval", eval_rows, eval_report)):
        ds = tokenize_preferences(rows, tokenizer, template, args.max_length, section.data.on_overlong, report, name)
        pairs[name] = ds
        log.info(report.summary(name))
    # RewardTrainer takes full sequences (prompt + reply through its end-of-turn token) as
    # chosen_ids / rejected_ids and, seeing them already tokenized, does not tokenize again.
    as_reward = {name: ds.map(lambda r: {"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                         "rejected_ids": r["prompt_ids"] + r["rejected_ids"]},
                              remove_columns=["prompt_ids"]) for name, ds in pairs.items()}

    model = load_model(recipe, task="seq_cls", merge=start, num_labels=1)
    model = add_lora(model, recipe, task="seq_cls")  # PEFT saves the score head with the adapter
    fingerprint = base_fingerprint(model)
    trainable, total = count_parameters(model)
    log.info("LoRA + score head: %d trainable of %d parameters", trainable, total)

    trainer = RewardTrainer(model=model, args=args, train_dataset=as_reward["train"],
                            eval_dataset=as_reward["eval"], processing_class=tokenizer)
    pad = tokenizer.pad_token_id
    before = pairwise_accuracy(model, pairs["eval"], pad)
    started = time.time()
    checkpoint = resume_from(recipe, "reward", section.resume)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    runtime = time.time() - started
    after = pairwise_accuracy(model, pairs["eval"], pad)

    metrics = {
        "eval_accuracy_before": before["accuracy"], "eval_accuracy": after["accuracy"],
        "eval_margin_before": before["margin"], "eval_margin": after["margin"],
        "train_loss": result.training_loss, "train_runtime_s": runtime,
        "train_pairs": len(pairs["train"]), "eval_pairs": len(pairs["eval"]),
        "skipped_bad_rows": train_report.skipped_bad + eval_report.skipped_bad,
        "skipped_identical_pairs": train_report.skipped_useless + eval_report.skipped_useless,
        "dropped_overlong_rows": train_report.dropped_overlong + eval_report.dropped_overlong,
        "global_steps": trainer.state.global_step, "resumed_from": checkpoint, "start_from": start,
        "base_fingerprint": fingerprint, "base_unchanged": base_fingerprint(model) == fingerprint,
    }
    out = save_stage(trainer, recipe, "reward", tokenizer, metrics)
    if main_process:
        print_summary("reward model done", [
            ("held-out pair accuracy", f"{before['accuracy']:.0%} -> {after['accuracy']:.0%}"),
            ("mean margin", f"{before['margin']:.3f} -> {after['margin']:.3f}"),
            ("trained", f"{metrics['global_steps']} steps on {len(pairs['train'])} pairs, {runtime:.1f}s"),
            ("data", f"{train_report.summary('train')}; {eval_report.summary('eval')}"),
            ("started from", ", ".join(start) or "the base"),
            ("output", str(out)),
        ])
    return metrics


def main(argv: list[str] | None = None) -> int:
    recipe = recipe_from_argv(sys.argv[1:] if argv is None else argv, "reward", "finetune reward")
    if recipe is not None:
        run(recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
