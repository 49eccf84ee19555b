"""ORPO stage: supervised fine-tuning and preference alignment in one LoRA stage, from the base model.

    accelerate launch finetune/orpo.py RECIPE [key=value ...]
    finetune orpo RECIPE [key=value ...]

load recipe -> preference pairs -> base + new LoRA (no reference model) -> held-out ORPO figures and
correctness before -> train (TRL's ORPOTrainer) -> after -> save -> summary.

ORPO (Hong et al. 2024, arXiv 2403.07691) adds an odds-ratio term to the NLL of the chosen reply, so one
stage both teaches the format and prefers the chosen reply: no SFT stage before it and no reference model
beside it. TRL 1.16 ships its trainer as `trl.experimental.orpo.ORPOTrainer` (not in the top-level package),
which is where this stage takes it from.
"""

from __future__ import annotations

import logging
import sys

from finetune.core.evaluation import Samples, held_out_correctness, orpo_eval
from finetune.core.modeling import add_lora, count_parameters, load_model
from finetune.core.progress import progress
from finetune.core.summary import print_summary, rate
from finetune.core.training import place_for_eval, prepare_preference_stage, save_stage, train
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe

log = logging.getLogger("finetune.orpo")

IGNORE_INDEX = -100


def _trainer_class():
    from trl.experimental.orpo import ORPOTrainer

    class PreTokenizedORPOTrainer(ORPOTrainer):
        """ORPOTrainer fed prompt_ids / chosen_ids / rejected_ids built by finetune.chat_template. TRL's own
        tokenize_row renders the prompt and each reply separately, adds BOS/EOS by guesswork and truncates
        over-long rows silently; our rows already hold exactly the inference prompt and each reply through its
        end-of-turn token, and over-long rows were counted and dropped, so each row only takes the column
        names the trainer's collator reads."""

        def tokenize_row(self, feature, model=None) -> dict:
            if "prompt_ids" not in feature:
                return super().tokenize_row(feature, model)
            prompt = feature["prompt_ids"]
            batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                reply = feature[f"{side}_ids"]
                batch[f"{side}_input_ids"] = prompt + reply
                batch[f"{side}_attention_mask"] = [1] * (len(prompt) + len(reply))
                batch[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + reply
            return batch

    return PreTokenizedORPOTrainer


def summarise(metrics: dict, train_pairs: int, replies: list[str], out) -> None:
    """ORPO's closing summary, from its metrics."""
    m = metrics
    print_summary(
        STAGES["orpo"].summary_title,
        [
            ("reward accuracy", f"{m['eval_rewards_accuracy_before']:.0%} -> {m['eval_rewards_accuracy']:.0%}"),
            ("reward margin", f"{m['eval_rewards_margin_before']:.3f} -> {m['eval_rewards_margin']:.3f}"),
            ("held-out correct", f"{rate(m['correct_rate_before'])} (base) -> {rate(m['correct_rate_after'])} (ORPO)"),
            ("trained", f"{m['global_steps']} steps on {train_pairs} pairs, {m['train_runtime_s']:.1f}s"),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("output", str(out)),
        ],
    )


def run(recipe: Recipe) -> dict:
    from trl.experimental.orpo import ORPOConfig

    section = recipe.orpo
    setup = prepare_preference_stage(recipe, "orpo", ORPOConfig)
    template, tokenizer, args, pairs = setup.template, setup.tokenizer, setup.args, setup.pairs
    # our collator input keeps its own column names (the trainer would otherwise say so in a warning)
    args.remove_unused_columns = False

    model = add_lora(load_model(recipe), recipe)
    trainable, total = count_parameters(model)
    log.info("LoRA: %d trainable of %d parameters; no reference model", trainable, total)
    with progress("orpo: setting up the trainer"):
        trainer = _trainer_class()(model=model, args=args, train_dataset=pairs["train"], processing_class=tokenizer)

    pad, beta = tokenizer.pad_token_id, args.beta
    place_for_eval(model, args, recipe)
    before = orpo_eval(model, pairs["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_before, _ = held_out_correctness(
        model, tokenizer, template, setup.eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples = Samples(recipe)
    samples.answer("base", model, tokenizer, template)
    trained = train(trainer, model, recipe, "orpo", setup.checkpoint)
    after = orpo_eval(model, pairs["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_after, replies = held_out_correctness(
        model, tokenizer, template, setup.eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples.answer("orpo", model, tokenizer, template)

    metrics = {
        "eval_rewards_accuracy_before": before["rewards_accuracy"],
        "eval_rewards_accuracy": after["rewards_accuracy"],
        "eval_rewards_margin_before": before["rewards_margin"],
        "eval_rewards_margin": after["rewards_margin"],
        "correct_rate_before": correct_before,
        "correct_rate_after": correct_after,
        "beta": beta,
        "sample_prompts": len(samples.prompts),
        **trained,
        **setup.data_metrics(),
    }
    out = save_stage(trainer, recipe, "orpo", tokenizer, metrics, samples=samples.rows(), reports=setup.reports)
    if setup.main_process:
        summarise(metrics, len(pairs["train"]), replies, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("orpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
