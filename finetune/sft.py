"""SFT stage: LoRA supervised fine-tuning of a Phi base on chat data.

    accelerate launch finetune/sft.py recipes/phi2_chat.yaml [key=value ...]
    finetune sft recipes/tiny_chat.yaml output_dir=/tmp/run sft.max_steps=20

load recipe -> data -> base + LoRA -> eval before -> train -> eval after -> save -> summary.
Labels come from finetune.chat_template (assistant turns only, end-of-turn token included), so
TRL gets ready `input_ids` / `labels` and never masks by pad id.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from finetune.chat_template import tokenize_prompt
from finetune.core import distributed
from finetune.core.batching import PackedRowsCollator, pack_rows
from finetune.core.data import tokenize_conversations, train_eval_rows
from finetune.core.evaluation import Samples, eval_loss, held_out_correctness
from finetune.core.modeling import (
    DTYPES,
    add_lora,
    choose_attention,
    count_parameters,
    load_model,
    load_tokenizer,
    template_for,
)
from finetune.core.progress import progress
from finetune.core.summary import print_summary, rate
from finetune.core.training import check_precision, place_for_eval, resume_checkpoint, save_stage, train, trl_config
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe

log = logging.getLogger("finetune.sft")


def sft_args(recipe: Recipe):
    """The SFTConfig of a recipe, with finetune's defaults under the recipe's own values."""
    from trl import SFTConfig

    return trl_config(recipe, "sft", SFTConfig, eval_strategy="no")


def make_trainer(recipe: Recipe, args, model, tokenizer, train_ds, eval_ds=None, **extra):
    """SFTTrainer over tokenized rows (input_ids / labels), packed when `args.packing`: padding-free
    packs, each sequence with its own position ids, so no FLOPs go to padding and no sequence attends
    to another. With FlashAttention-2 that is TRL's own packing (bfd packs flattened into one row, the
    varlen kernel reads the sequence boundaries); with SDPA or eager, packs stay one row each
    (`PackedRowsCollator`), since SDPA on one flattened row would attend over the whole batch (B*L)^2."""
    from trl import SFTTrainer

    attn = choose_attention(recipe.model.attn_implementation, DTYPES[recipe.precision])[0]
    collator = None
    if args.packing and attn != "flash_attention_2":
        rows = len(train_ds)
        train_ds = pack_rows(train_ds, args.max_length)
        log.info(
            "packing: %d rows into %d rows of at most %d tokens (position ids per sequence, %s)",
            rows,
            len(train_ds),
            args.max_length,
            attn,
        )
        args.packing = False  # TRL would flatten the batch into one row (padding-free for flash-attn varlen only)
        collator = PackedRowsCollator(tokenizer.pad_token_id)
    with progress("sft: setting up the trainer"):
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            data_collator=collator,
            **extra,
        )


def summarise(metrics: dict, data: str, prompt: str, replies: list[str], out: Path) -> None:
    """SFT's closing summary, from its metrics."""
    print_summary(
        STAGES["sft"].summary_title,
        [
            (
                "eval loss",
                f"{metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f} "
                f"({metrics['eval_loss_reduction']:.0%} lower)",
            ),
            ("held-out correct", f"{rate(metrics['correct_rate_before'])} -> {rate(metrics['correct_rate_after'])}"),
            (
                "trained",
                f"{metrics['global_steps']} steps, {metrics['train_tokens']} tokens, {metrics['train_runtime_s']:.1f}s",
            ),
            ("data", data),
            ("sample prompt", repr(prompt)),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("output", str(out)),
        ],
    )


def run(recipe: Recipe) -> dict:
    from transformers import set_seed

    section = recipe.sft
    check_precision(recipe)
    set_seed(recipe.seed)
    template = template_for(recipe)
    tokenizer = load_tokenizer(recipe)
    args = sft_args(recipe)
    main_process = distributed.is_main()

    train_rows, eval_rows, train_report, eval_report = train_eval_rows(section.data, recipe, recipe.seed)
    train_ds = tokenize_conversations(
        train_rows, tokenizer, template, args.max_length, section.data.on_overlong, train_report, "train"
    )
    eval_ds = tokenize_conversations(
        eval_rows, tokenizer, template, args.max_length, section.data.on_overlong, eval_report, "eval"
    )
    log.info(train_report.summary("train"))
    log.info(eval_report.summary("eval"))
    checkpoint = resume_checkpoint(recipe, "sft", args, train_rows, [])

    model = add_lora(load_model(recipe), recipe)
    trainable, total = count_parameters(model)
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)

    trainer = make_trainer(recipe, args, model, tokenizer, train_ds, eval_ds)
    place_for_eval(model, args, recipe)
    before = eval_loss(model, eval_ds, tokenizer.pad_token_id, args.per_device_eval_batch_size)
    correct_before, _ = held_out_correctness(
        model, tokenizer, template, eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples = Samples(recipe)
    samples.answer("base", model, tokenizer, template)
    trained = train(trainer, model, recipe, "sft", checkpoint)
    after = eval_loss(model, eval_ds, tokenizer.pad_token_id, args.per_device_eval_batch_size)
    correct_after, replies = held_out_correctness(
        model, tokenizer, template, eval_rows, section.eval_generate_rows, section.max_new_tokens
    )
    samples.answer("sft", model, tokenizer, template)

    epochs = trainer.state.epoch or 0
    metrics = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "eval_loss_reduction": 1 - after / before,
        "correct_rate_before": correct_before,
        "correct_rate_after": correct_after,
        "train_tokens": int(sum(len(x) for x in train_ds["input_ids"]) * epochs),
        "train_label_tokens": int(sum(sum(t != -100 for t in y) for y in train_ds["labels"]) * epochs),
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds),
        "skipped_bad_rows": train_report.skipped_bad + eval_report.skipped_bad,
        "dropped_overlong_rows": train_report.dropped_overlong + eval_report.dropped_overlong,
        "eval_rows_left_out": eval_report.left_out,
        "trainable_parameters": trainable,
        "sample_prompts": len(samples.prompts),
        **trained,
    }
    out = save_stage(
        trainer,
        recipe,
        "sft",
        tokenizer,
        metrics,
        samples=samples.rows(),
        reports={"train": train_report, "eval": eval_report},
    )
    if main_process:
        prompt = eval_rows[0]["messages"][:1] if eval_rows else None
        data = f"{train_report.summary('train')}; {eval_report.summary('eval')}"
        summarise(metrics, data, tokenizer.decode(tokenize_prompt(tokenizer, prompt)) if prompt else "", replies, out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("sft", run, argv)


if __name__ == "__main__":
    sys.exit(main())
