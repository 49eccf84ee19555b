"""DPO stage: LoRA direct preference optimisation on top of the SFT model.

    accelerate launch finetune/dpo.py RECIPE [key=value ...]
    finetune dpo RECIPE [key=value ...]

load recipe -> pairs -> SFT-merged base + new LoRA (reference = adapters disabled = the SFT model)
-> held-out DPO figures and correctness before -> train (TRL DPOTrainer) -> after -> save -> summary.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from finetune.core import distributed
from finetune.core.evaluation import Samples, dpo_eval, held_out_correctness
from finetune.core.modeling import add_lora, count_parameters, load_model
from finetune.core.outputs import save_stage
from finetune.core.progress import progress
from finetune.core.summary import print_summary, rate
from finetune.core.training import ReferenceIsTheStart, place_for_eval, prepare_preference_stage, train
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError

log = logging.getLogger("finetune.dpo")


def _trainer_class():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(ReferenceIsTheStart, DPOTrainer):
        """DPOTrainer fed prompt_ids / chosen_ids / rejected_ids built by finetune.chat_template.

        TRL would re-render and re-tokenize the conversations itself (and, for conversational rows,
        train the tokens after the end-of-turn token too); our rows already hold exactly the
        inference prompt and each reply through its end-of-turn token, and over-long rows were
        counted and dropped, so preparation is skipped.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreTokenizedDPOTrainer


def make_trainer(args, model, tokenizer, train_pairs, eval_pairs=None, **extra):
    """TRL's DPOTrainer on our tokenized pairs. TRL already runs chosen and rejected as one
    concatenated forward (batch = [chosen; rejected]) and reads log-probs from the fused LM head;
    with `precompute_ref_log_probs` the reference runs once over the data before training."""
    with progress("dpo: setting up the trainer"):
        return _trainer_class()(
            model=model,
            args=args,
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            processing_class=tokenizer,
            **extra,
        )


def summarise(metrics: dict, train_pairs: int, replies: list[str], start: list[str], out: Path) -> None:
    """DPO's closing summary, from its metrics."""
    m = metrics
    print_summary(
        STAGES["dpo"].summary_title,
        [
            ("held-out DPO loss", f"{m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}"),
            ("reward accuracy", f"{m['eval_rewards_accuracy_before']:.0%} -> {m['eval_rewards_accuracy']:.0%}"),
            ("reward margin", f"{m['eval_rewards_margin_before']:.3f} -> {m['eval_rewards_margin']:.3f}"),
            (
                "held-out correct",
                f"{rate(m['correct_rate_start'])} (start model) -> {rate(m['correct_rate_after'])} (DPO)",
            ),
            ("trained", f"{m['global_steps']} steps on {train_pairs} pairs, {m['train_runtime_s']:.1f}s"),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("started from", ", ".join(start) or "the base"),
            ("output", str(out)),
        ],
    )


def run(recipe: Recipe) -> dict:
    from trl import DPOConfig

    section = recipe.dpo
    setup = prepare_preference_stage(recipe, "dpo", DPOConfig)
    start, template, tokenizer, args, pairs = setup.start, setup.template, setup.tokenizer, setup.args, setup.pairs
    eval_rows = setup.eval_rows
    if args.precompute_ref_log_probs and distributed.world_size() > 1:
        # Seen with TRL 1.16 + datasets 5.2 on 2 processes: the precompute map reads a cache file that
        # only the other process's temporary folder holds (FileNotFoundError on *.arrow).
        raise RecipeError(
            f"{recipe.source}: dpo.precompute_ref_log_probs: not supported with several processes "
            "yet; set dpo.precompute_ref_log_probs=false (the reference then runs each step) or run "
            "one process"
        )

    model = add_lora(load_model(recipe, merge=start), recipe)
    trainable, total = count_parameters(model)
    log.info("LoRA: %d trainable of %d parameters; reference = the start model (adapters disabled)", trainable, total)

    # no eval set for TRL: the held-out figures are ours (dpo_eval), and with precomputed reference log-probs TRL
    # would run a reference pass over the held-out pairs too, for nothing
    trainer = make_trainer(args, model, tokenizer, pairs["train"])
    pad, beta = tokenizer.pad_token_id, args.beta
    place_for_eval(model, args, recipe)
    before = dpo_eval(model, pairs["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_before, _ = held_out_correctness(
        model, tokenizer, template, eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples = Samples(recipe)
    samples.answer("start", model, tokenizer, template)  # the SFT model: the start, adapters of this stage new
    trained = train(trainer, model, recipe, "dpo", setup.checkpoint)
    after = dpo_eval(model, pairs["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_after, replies = held_out_correctness(
        model, tokenizer, template, eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples.answer("dpo", model, tokenizer, template)

    metrics = {
        "eval_loss_before": before["loss"],
        "eval_loss": after["loss"],
        "eval_rewards_accuracy_before": before["rewards_accuracy"],
        "eval_rewards_accuracy": after["rewards_accuracy"],
        "eval_rewards_margin_before": before["rewards_margin"],
        "eval_rewards_margin": after["rewards_margin"],
        # correctness of greedy answers on held-out prompts: the start (SFT) model vs the DPO model
        "correct_rate_start": correct_before,
        "correct_rate_after": correct_after,
        "beta": beta,
        "loss_type": list(args.loss_type),
        "sample_prompts": len(samples.prompts),
        **trained,
        **setup.data_metrics(),
    }
    out = save_stage(trainer, recipe, "dpo", tokenizer, metrics, samples=samples.rows(), reports=setup.reports)
    if setup.main_process:
        summarise(metrics, len(pairs["train"]), replies, start, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("dpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
