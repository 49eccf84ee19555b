"""Trainer settings shared by the TRL-based stages: one mapping from recipe to TRL config."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from finetune.recipe import STAGES, Recipe, RecipeError

from . import distributed, tracking
from .data import to_preference, tokenize_preferences, train_eval_rows
from .lineage import start_chain
from .modeling import base_fingerprint, load_tokenizer, template_for
from .progress import Progress, duration, library_bars_off, progress, step_line
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


def trl_config(recipe: Recipe, stage: str, config_cls, **fixed):
    """The stage's TRL config: the keys the recipe owns elsewhere (output_dir, seed, precision, ...), then the
    stage's TRL settings in their one order of precedence (Recipe.trl_settings: finetune's defaults, the
    stage's registry defaults, the recipe), then `fixed`."""
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
    )
    kwargs.update(recipe.trl_settings(stage, distributed.world_size()))
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
            figures.update({label: logs.get(key) for key, label in STAGES[self.stage].step_figures})
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


class ReferenceIsTheStart:
    """Mixin for TRL's DPOTrainer and KTOTrainer on a new LoRA adapter, whose reference is the start model
    (the adapters disabled): TRL's reference pass (`precompute_ref_log_probs`) reported like every other phase,
    and no copied "ref" adapter in the reference forwards."""

    _ref_bar = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_copied_reference_adapter()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's pass of the reference over the data, reported like every other phase: its own tqdm bar is off
        (it reads TQDM_DISABLE) and batches are counted in compute_ref_log_probs below."""
        batches = -(-len(dataset) // (batch_size * distributed.world_size()))
        self._drop_copied_reference_adapter()  # runs inside the trainer's __init__, after TRL's copy
        stage = getattr(self, "finetune_stage", "reference")
        try:
            with (
                library_bars_off(),
                progress(f"{stage} reference log-probs ({name})", total=batches, unit="batches") as self._ref_bar,
            ):
                return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._ref_bar = None

    def compute_ref_log_probs(self, model, batch):
        out = super().compute_ref_log_probs(model, batch)
        if self._ref_bar is not None:
            self._ref_bar.update(1)
        return out

    def _drop_copied_reference_adapter(self):
        """Given a PeftModel, TRL 1.16 copies its adapter into a frozen "ref" adapter and runs every reference
        forward through it. Our adapter is new (lora_B = 0), so that copy is exactly the model with adapters
        disabled, at the price of the LoRA matmuls in every reference forward (bench/run.py --stage dpo: the
        reference pass took 1.5x as long). Without "ref", TRL disables the adapters for the reference, the
        reference these stages document. A copy of a trained adapter (any lora_B non-zero) is kept: then it
        is the reference."""
        model = self.accelerator.unwrap_model(self.model)
        if "ref" not in getattr(model, "peft_config", {}):
            return
        if any(p.detach().any() for n, p in model.named_parameters() if ".ref." in n and "lora_B" in n):
            return
        model.delete_adapter("ref")


@dataclass
class PreferenceSetup:
    """What the preference stages (reward, DPO, KTO, ORPO) share before their model is built."""

    stage: str
    start: list[str]
    template: object
    tokenizer: object
    args: object
    pairs: dict  # name -> datasets.Dataset of tokenized rows (prompt_ids / chosen_ids / rejected_ids, or KTO's)
    eval_rows: list[dict]
    reports: dict  # name -> DataReport
    checkpoint: Path | None = None  # where training continues from (None: from the start)

    @property
    def main_process(self) -> bool:
        return distributed.is_main()

    def data_metrics(self) -> dict:
        train, evals = self.reports["train"], self.reports["eval"]
        unit = STAGES[self.stage].unit  # pairs, or rows (KTO's unpaired replies)
        return {
            f"train_{unit}": len(self.pairs["train"]),
            f"eval_{unit}": len(self.pairs["eval"]),
            "skipped_bad_rows": train.skipped_bad + evals.skipped_bad,
            "skipped_identical_pairs": train.skipped_useless + evals.skipped_useless,
            "dropped_overlong_rows": train.dropped_overlong + evals.dropped_overlong,
            "eval_rows_left_out": evals.left_out,
            "start_from": self.start,
        }

    def data_summary(self) -> str:
        return "; ".join(report.summary(name) for name, report in self.reports.items())


def prepare_preference_stage(
    recipe: Recipe, stage: str, config_cls, convert=to_preference, tokenize=tokenize_preferences
) -> PreferenceSetup:
    """Checks, seed, tokenizer, TRL config and tokenized rows for a preference stage: rows read with `convert`
    (default: preference pairs) and tokenized with `tokenize`. A stage with a `start_from` key starts from that
    adapter chain; one without (ORPO) from the base."""
    from transformers import set_seed

    section = recipe.section(stage)
    check_precision(recipe)
    start = start_chain(recipe, stage) if "start_from" in type(section).model_fields else []
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    args = trl_config(recipe, stage, config_cls, eval_strategy="no")
    train_rows, eval_rows, train_report, eval_report = train_eval_rows(section.data, recipe, recipe.seed, convert)
    reports = {"train": train_report, "eval": eval_report}
    pairs = {
        name: tokenize(rows, tokenizer, template, args.max_length, section.data.on_overlong, reports[name], name)
        for name, rows in (("train", train_rows), ("eval", eval_rows))
    }
    checkpoint = resume_checkpoint(recipe, stage, args, train_rows, start)
    setup = PreferenceSetup(stage, start, template, tokenizer, args, pairs, eval_rows, reports, checkpoint)
    log.info(setup.data_summary())
    return setup
