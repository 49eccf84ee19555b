"""Trainer settings shared by the TRL-based stages: one mapping from recipe to TRL config."""

from __future__ import annotations

import logging
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
