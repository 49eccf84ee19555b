"""Trainer settings shared by the TRL-based stages: one mapping from recipe to TRL config."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from finetune.recipe import Recipe, RecipeError
from finetune.recipe.trl_fields import TRL_DEFAULTS

from . import distributed, tracking
from .batching import PACKED_KEYS, PackingCollator, row_tokens
from .data import to_preference, tokenize_preferences, train_eval_rows
from .lineage import start_chain
from .modeling import base_fingerprint, load_tokenizer, template_for
from .outputs import setup_logging
from .progress import Progress, duration, progress, step_line
from .resume import choose_checkpoint, hf_beyond, run_identity

log = logging.getLogger(__name__)


def check_precision(recipe: Recipe) -> None:
    """fp16 / bf16 mixed precision needs hardware that has it; say so before loading anything."""
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(
            f"{recipe.source}: precision: fp16 training needs a CUDA GPU and none is visible; on CPU override "
            "precision=fp32 (or bf16)"
        )


def trackers(recipe: Recipe) -> list[str] | str:
    """The report_to of a TRL config: only the trackers finetune does not write itself. tensorboard,
    mlflow and wandb (mlflow added inside an Azure ML job) are written by finetune.core.tracking, fed by
    `train` below, with the names and grouping every stage shares."""
    return tracking.for_transformers(recipe)


def trl_config(recipe: Recipe, stage: str, config_cls, defaults: dict | None = None, **fixed):
    """The stage's TRL config: recipe-owned keys + finetune's `defaults` for the stage + shared
    `training` + the stage's own fields (later wins), then `fixed`."""
    kwargs = dict(
        output_dir=str(recipe.checkpoint_dir(stage)),
        seed=recipe.seed,
        data_seed=recipe.seed,
        fp16=recipe.precision == "fp16",
        bf16=recipe.precision == "bf16",
        deepspeed=recipe.resolve_path(recipe.deepspeed),
        logging_steps=recipe.logging.logging_steps,
        report_to=trackers(recipe),
        use_cpu=not torch.cuda.is_available(),
        **TRL_DEFAULTS,
        **(defaults or {}),
    )
    kwargs.update(recipe.training_args(stage))  # a recipe's old name means the new one, and beats our default
    kwargs.update(fixed)
    config = config_cls(**kwargs)
    if getattr(config, "max_length", 0) is None:
        raise RecipeError(
            f"{recipe.source}: {stage}.max_length: must be a number; finetune counts and reports "
            "rows longer than it instead of truncating them"
        )
    return config


def place_for_eval(model, args, recipe: Recipe):
    """Put the model on the training device before the pre-training held-out checks. The Trainer
    leaves the model where it is under DeepSpeed until train() starts, which would run the
    "before" evaluation of Phi-2 on the CPU (and all-reduce a CPU tensor over NCCL)."""
    if not recipe.model.load_in_4bit:  # a 4-bit model is placed by its device_map and cannot move
        model.to(args.device)
    return model


def resume_checkpoint(recipe: Recipe, stage: str, args, rows: list[dict], start: list[str]) -> Path | None:
    """The checkpoint a TRL stage continues from (core.resume's rules: the newest complete one of the same
    run), decided before the model loads so that a refusal comes at once."""
    identity = run_identity(recipe, stage, rows, start)
    return choose_checkpoint(
        recipe, stage, recipe.section(stage).resume, identity, beyond=hf_beyond(recipe, stage, args)
    )


# What each TRL stage's one-line step log shows after loss and learning rate: (Trainer log key, label).
STEP_FIGURES = {
    "sft": [("mean_token_accuracy", "token acc"), ("grad_norm", "grad norm")],
    "reward": [("accuracy", "pair acc"), ("margin", "margin"), ("grad_norm", "grad norm")],
    "dpo": [("rewards/accuracies", "reward acc"), ("rewards/margins", "margin"), ("grad_norm", "grad norm")],
}


class StepLog(TrainerCallback):
    """The Trainer's progress and logs in finetune's one style (finetune.core.progress): a bar at a
    terminal or timed lines elsewhere, and at each logging step one line
    `dpo     step 10/40  loss 0.3545  lr 9.6e-04  reward acc 0.9  margin 1.2  grad norm 0.8`
    instead of transformers' ProgressCallback / PrinterCallback dictionaries (which `verbose` prints too)."""

    def __init__(self, stage: str, verbose: bool = False):
        self.stage, self.verbose = stage, verbose
        self.bar: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress(
                f"{self.stage} training", total=state.max_steps, initial=state.global_step, unit="steps", announce=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.set(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "train_runtime" in logs:  # the Trainer's closing summary
            line = (
                f"{self.stage:<7} trained {state.global_step} steps in {duration(logs['train_runtime'])}, "
                f"mean loss {logs.get('train_loss', float('nan')):.4g}"
            )
        else:
            lr = logs.get("learning_rate")
            figures = {"loss": logs.get("loss"), "lr": None if lr is None else f"{lr:.2e}"}
            figures.update({label: logs.get(key) for key, label in STEP_FIGURES.get(self.stage, [])})
            figures["epoch"] = round(logs["epoch"], 2) if "epoch" in logs else None
            line = step_line(self.stage, state.global_step, state.max_steps, figures)
            if logs.get("loss") is not None:
                self.bar.postfix = {"loss": f"{logs['loss']:.4g}"}
        self.bar.write(line)
        if self.verbose:
            self.bar.write(str({k: v for k, v in logs.items() if k != "total_flos"}))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_step_log(trainer, stage: str, verbose: bool = False) -> None:
    """Swap the Trainer's own progress and log printing for StepLog (idempotent)."""
    for cls in (ProgressCallback, PrinterCallback, StepLog):
        trainer.remove_callback(cls)
    trainer.add_callback(StepLog(stage, verbose))


def train(trainer, model, recipe: Recipe, stage: str, checkpoint: Path | None) -> dict:
    """Run the trainer (from `checkpoint` when given: see resume_checkpoint) and report it, including
    whether the frozen base stayed bitwise equal (sha256 of its parameters before and after)."""
    use_step_log(trainer, stage, recipe.logging.verbose)
    fingerprint = base_fingerprint(model)
    checkpoint = str(checkpoint) if checkpoint else None
    if tracking.current().active:
        trainer.add_callback(tracking.trainer_callback(tracking.current()))
    started = time.time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    runtime = time.time() - started
    after = base_fingerprint(model)
    if after != fingerprint:
        log.error("%s: the frozen base changed during training (fingerprint %s -> %s)", stage, fingerprint, after)
    return {
        "train_loss": result.training_loss,
        "train_runtime_s": runtime,
        "global_steps": trainer.state.global_step,
        "resumed_from": checkpoint,
        "base_fingerprint": fingerprint,
        "base_unchanged": after == fingerprint,
    }


class PaddingFree:
    """Padding-free batches for a TRL preference trainer (DPO, reward): mixed in before the trainer class,
    with `packed_forward` given by the stage.

    The trainer's own collator is wrapped in batching.PackingCollator, so a batch is TRL's padded batch plus
    the same sequences packed. Where the trainer runs its model on a batch, the subclass wraps the call in
    `packed(batch)`: the packed tensors leave the batch, and for that call the innermost model's forward
    becomes `packed_forward(model, original forward, packed)`, which runs the packed sequences and returns
    what the original returns for the padded batch (per-sequence figures laid back out in its shape). TRL's
    loss, metrics and every loss type run unchanged on that; only the FLOPs spent on padding are gone.

    Rows hold several sequences each on SDPA / eager (block-diagonal mask from the position ids), up to
    batching.row_tokens; with a FlashAttention kernel everything is one row (varlen needs one row: with
    several, FlashAttention would treat each row as one causal sequence)."""

    _pack_batches = False  # set from the recipe before the trainer's __init__ (TRL reads the collator in it)

    def _use_packing(self) -> None:
        """Wrap the collator TRL built (idempotent: TRL's reference pre-pass runs inside its __init__)."""
        if self._pack_batches and not isinstance(self.data_collator, PackingCollator):
            config = self._inner(self.model).config
            attn = str(getattr(config, "_attn_implementation", ""))
            pad_id = self.processing_class.pad_token_id
            capacity = row_tokens(config.get_text_config())
            self.data_collator = PackingCollator(self.data_collator, pad_id, one_row="flash" in attn, capacity=capacity)

    def _inner(self, model):
        """The transformers model under accelerate's and PEFT's wrappers: the one whose forward runs the layers."""
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @contextlib.contextmanager
    def packed(self, batch: dict):
        """Within this block, model calls on `batch` (which loses its packed keys) run on its packed form."""
        packed = {key: batch.pop(key) for key in PACKED_KEYS if key in batch}
        if not packed:
            yield
            return
        ref = getattr(self, "ref_model", None)  # DPO with an explicit reference model
        models = {id(m): m for m in (self._inner(self.model), ref and self._inner(ref)) if m is not None}
        swapped = []
        try:
            for model in models.values():
                own = model.__dict__.get("forward")  # TRL's fused LM head is an instance attribute; else the class's
                model.forward = self.packed_forward(model, model.forward, packed)
                swapped.append((model, own))
            yield
        finally:
            for model, own in swapped:
                if own is None:
                    del model.forward
                else:
                    model.forward = own

    def packed_forward(self, model, original, packed: dict):
        raise NotImplementedError


@dataclass
class PreferenceSetup:
    """What the preference stages (reward, DPO) share before their model is built."""

    start: list[str]
    template: object
    tokenizer: object
    args: object
    pairs: dict  # name -> datasets.Dataset of prompt_ids / chosen_ids / rejected_ids
    eval_rows: list[dict]
    reports: dict  # name -> DataReport
    checkpoint: Path | None = None  # where training continues from (None: from the start)

    @property
    def main_process(self) -> bool:
        return distributed.is_main()

    def data_metrics(self) -> dict:
        train, evals = self.reports["train"], self.reports["eval"]
        return {
            "train_pairs": len(self.pairs["train"]),
            "eval_pairs": len(self.pairs["eval"]),
            "skipped_bad_rows": train.skipped_bad + evals.skipped_bad,
            "skipped_identical_pairs": train.skipped_useless + evals.skipped_useless,
            "dropped_overlong_rows": train.dropped_overlong + evals.dropped_overlong,
            "eval_rows_left_out": evals.left_out,
            "start_from": self.start,
        }

    def data_summary(self) -> str:
        return "; ".join(report.summary(name) for name, report in self.reports.items())


def prepare_preference_stage(recipe: Recipe, stage: str, config_cls) -> PreferenceSetup:
    """Checks, seed, tokenizer, TRL config and tokenized preference pairs for a preference stage."""
    from transformers import set_seed

    section = getattr(recipe, stage)
    check_precision(recipe)
    start = start_chain(recipe, stage)
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    args = trl_config(recipe, stage, config_cls, eval_strategy="no")
    setup_logging(distributed.is_main(), recipe.logging.verbose)
    train_rows, eval_rows, train_report, eval_report = train_eval_rows(section.data, recipe, recipe.seed, to_preference)
    reports = {"train": train_report, "eval": eval_report}
    pairs = {
        name: tokenize_preferences(
            rows, tokenizer, template, args.max_length, section.data.on_overlong, reports[name], name
        )
        for name, rows in (("train", train_rows), ("eval", eval_rows))
    }
    checkpoint = resume_checkpoint(recipe, stage, args, train_rows, start)
    setup = PreferenceSetup(start, template, tokenizer, args, pairs, eval_rows, reports, checkpoint)
    log.info(setup.data_summary())
    return setup
