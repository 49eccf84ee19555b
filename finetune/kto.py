"""KTO stage: LoRA Kahneman-Tversky optimisation on top of the SFT model, from replies marked desirable or not.

    accelerate launch finetune/kto.py RECIPE [key=value ...]
    finetune kto RECIPE [key=value ...]

load recipe -> unpaired rows (prompt / completion / label; preference pairs split into a desirable and an
undesirable row) -> SFT-merged base + new LoRA (reference = adapters disabled = the SFT model) -> held-out
KTO figures and correctness before -> train (TRL KTOTrainer) -> after -> save -> summary.

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) needs no pairs: each reply is judged alone against a KL
estimate from mismatched (prompt, reply) pairs of the same batch, which is what thumbs-up / thumbs-down
data gives.
"""

from __future__ import annotations

import logging
import sys

from finetune.core.data import to_unpaired, tokenize_unpaired
from finetune.core.evaluation import Samples, held_out_correctness, kto_eval
from finetune.core.modeling import add_lora, count_parameters, load_model
from finetune.core.progress import progress
from finetune.core.summary import print_summary, rate
from finetune.core.training import ReferenceIsTheStart, place_for_eval, prepare_preference_stage, save_stage, train
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe

log = logging.getLogger("finetune.kto")


def _trainer_class():
    from trl import KTOTrainer

    class PreTokenizedKTOTrainer(ReferenceIsTheStart, KTOTrainer):
        """KTOTrainer fed prompt_ids / completion_ids / label built by finetune.chat_template (the inference prompt,
        each reply through its end-of-turn token; over-long rows counted and dropped before), so TRL's
        re-rendering, re-tokenizing and truncation are skipped. What TRL's preparation adds beyond that is kept:
        the mismatched completions of its KL estimate."""

        finetune_stage = "kto"

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not {"prompt_ids", "completion_ids", "label"} <= set(dataset.column_names):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL:
                return dataset

            # TRL's KL estimate (kto_trainer._prepare_dataset): each completion paired with the prompt of the
            # row before it, within batches of per_device_train_batch_size (the batch the trainer forwards)
            def rotate(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    return PreTokenizedKTOTrainer


def summarise(metrics: dict, train_rows: int, replies: list[str], start: list[str], out) -> None:
    """KTO's closing summary, from its metrics."""
    m = metrics
    print_summary(
        STAGES["kto"].summary_title,
        [
            (
                "reward accuracy",
                f"{m['eval_rewards_accuracy_before']:.0%} -> {m['eval_rewards_accuracy']:.0%} (reward sign = label)",
            ),
            (
                "reward margin",
                f"{m['eval_rewards_margin_before']:.3f} -> {m['eval_rewards_margin']:.3f} (desirable - undesirable)",
            ),
            (
                "held-out correct",
                f"{rate(m['correct_rate_start'])} (start model) -> {rate(m['correct_rate_after'])} (KTO)",
            ),
            (
                "trained",
                f"{m['global_steps']} steps on {train_rows} rows ({m['desirable_rows']} desirable), "
                f"{m['train_runtime_s']:.1f}s",
            ),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("started from", ", ".join(start) or "the base"),
            ("output", str(out)),
        ],
    )


def run(recipe: Recipe) -> dict:
    from trl import KTOConfig

    section = recipe.kto
    setup = prepare_preference_stage(recipe, "kto", KTOConfig, convert=to_unpaired, tokenize=tokenize_unpaired)
    start, template, tokenizer, args, rows = setup.start, setup.template, setup.tokenizer, setup.args, setup.pairs

    model = add_lora(load_model(recipe, merge=start), recipe)
    trainable, total = count_parameters(model)
    log.info("LoRA: %d trainable of %d parameters; reference = the start model (adapters disabled)", trainable, total)
    with progress("kto: setting up the trainer"):
        trainer = _trainer_class()(model=model, args=args, train_dataset=rows["train"], processing_class=tokenizer)

    pad, beta = tokenizer.pad_token_id, args.beta
    place_for_eval(model, args, recipe)
    before = kto_eval(model, rows["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_before, _ = held_out_correctness(
        model, tokenizer, template, setup.eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples = Samples(recipe)
    samples.answer("start", model, tokenizer, template)
    trained = train(trainer, model, recipe, "kto", setup.checkpoint)
    after = kto_eval(model, rows["eval"], beta, pad, args.per_device_eval_batch_size)
    correct_after, replies = held_out_correctness(
        model, tokenizer, template, setup.eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples.answer("kto", model, tokenizer, template)

    metrics = {
        "eval_rewards_accuracy_before": before["rewards_accuracy"],
        "eval_rewards_accuracy": after["rewards_accuracy"],
        "eval_rewards_margin_before": before["rewards_margin"],
        "eval_rewards_margin": after["rewards_margin"],
        "correct_rate_start": correct_before,
        "correct_rate_after": correct_after,
        "beta": beta,
        "loss_type": args.loss_type,
        "desirable_rows": int(sum(rows["train"]["label"])),
        "sample_prompts": len(samples.prompts),
        **trained,
        **setup.data_metrics(),
    }
    out = save_stage(trainer, recipe, "kto", tokenizer, metrics, samples=samples.rows(), reports=setup.reports)
    if setup.main_process:
        summarise(metrics, len(rows["train"]), replies, start, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("kto", run, argv)


if __name__ == "__main__":
    sys.exit(main())
