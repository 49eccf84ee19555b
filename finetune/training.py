"""Trainer settings shared by the TRL-based stages: one mapping from recipe to TRL config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .recipe import Recipe, RecipeError

log = logging.getLogger(__name__)


def checkpoint_dir(recipe: Recipe, stage: str) -> Path:
    return Path(recipe.output_dir) / f"{stage}-checkpoints"


def check_precision(recipe: Recipe) -> None:
    """fp16 / bf16 mixed precision needs hardware that has it; say so before loading anything."""
    if recipe.precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(
            f"{recipe.source}: precision: fp16 training needs a CUDA GPU and none is visible; on CPU override "
            "precision=fp32 (or bf16)"
        )


def trl_config(recipe: Recipe, stage: str, config_cls, **fixed):
    """The stage's TRL config: recipe-owned keys + shared `training` + the stage's own fields."""
    kwargs = dict(
        output_dir=str(checkpoint_dir(recipe, stage)),
        seed=recipe.seed,
        data_seed=recipe.seed,
        fp16=recipe.precision == "fp16",
        bf16=recipe.precision == "bf16",
        deepspeed=recipe.resolve_path(recipe.deepspeed),
        logging_steps=recipe.logging.logging_steps,
        report_to=recipe.logging.report_to or "none",
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(recipe.training_args(stage))
    kwargs.update(fixed)
    return config_cls(**kwargs)


def resume_from(recipe: Recipe, stage: str, resume: bool | str):
    """Checkpoint to resume from: the newest in the stage's checkpoint folder when resume is true."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is False:
        return None
    if isinstance(resume, str):
        if not Path(resume).is_dir():
            raise RecipeError(f"{recipe.source}: {stage}.resume: checkpoint folder not found: {resume}")
        return resume
    folder = checkpoint_dir(recipe, stage)
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last:
        log.info("resuming %s from %s", stage, last)
    return last


def check_start_adapters(recipe: Recipe, stage: str) -> list[str]:
    """The adapters a stage starts from, checked: present, and made for this base and template."""
    import yaml

    folders = recipe.start_adapters(stage)
    for folder in folders:
        path = Path(folder)
        if not (path / "adapter_config.json").is_file():
            raise RecipeError(
                f"{recipe.source}: {stage}.start_from: no adapter at {path}; run the stage that makes it first "
                f"(e.g. finetune sft {recipe.source}) or set {stage}.start_from=base"
            )
        made = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
        for key, ours in (("model", recipe.model.name_or_path), ("template", recipe.template.name)):
            theirs = (made.get(key) or {}).get("name_or_path" if key == "model" else "name")
            if theirs != ours:
                raise RecipeError(
                    f"{recipe.source}: {stage}.start_from: {path} was trained with {key} {theirs!r}, this recipe "
                    f"uses {ours!r}; point start_from at an output of the same base model and template"
                )
    return folders


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

    @property
    def main_process(self) -> bool:
        return self.args.process_index == 0

    def data_metrics(self) -> dict:
        train, evals = self.reports["train"], self.reports["eval"]
        return {
            "train_pairs": len(self.pairs["train"]), "eval_pairs": len(self.pairs["eval"]),
            "skipped_bad_rows": train.skipped_bad + evals.skipped_bad,
            "skipped_identical_pairs": train.skipped_useless + evals.skipped_useless,
            "dropped_overlong_rows": train.dropped_overlong + evals.dropped_overlong,
            "start_from": self.start,
        }

    def data_summary(self) -> str:
        return "; ".join(report.summary(name) for name, report in self.reports.items())


def prepare_preference_stage(recipe: Recipe, stage: str, config_cls) -> PreferenceSetup:
    """Checks, seed, tokenizer, TRL config and tokenized preference pairs for a preference stage."""
    from transformers import set_seed

    from .data import to_preference, tokenize_preferences, train_eval_rows
    from .modeling import load_tokenizer, template_for
    from .outputs import setup_logging

    section = getattr(recipe, stage)
    check_precision(recipe)
    start = check_start_adapters(recipe, stage)
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    args = trl_config(recipe, stage, config_cls, eval_strategy="no")
    setup_logging(args.process_index == 0)
    train_rows, eval_rows, train_report, eval_report = train_eval_rows(section.data, recipe, recipe.seed,
                                                                       to_preference)
    reports = {"train": train_report, "eval": eval_report}
    pairs = {name: tokenize_preferences(rows, tokenizer, template, args.max_length, section.data.on_overlong,
                                        reports[name], name)
             for name, rows in (("train", train_rows), ("eval", eval_rows))}
    setup = PreferenceSetup(start, template, tokenizer, args, pairs, eval_rows, reports)
    log.info(setup.data_summary())
    return setup
