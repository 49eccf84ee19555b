"""Adapter chains: which LoRA adapters make a stage output's model, checked before anything loads.

A stage output records the adapters it was trained on top of (`start_from` in its metrics.json); its
model is those merged into the base in order, then its own adapter. Training stages start from such
a chain; export and chat merge one; PPO shares one between its policy and reward model.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.recipe import STAGES, Recipe, RecipeError

from .integrity import DamagedFileError, check_safetensors, read_json
from .outputs import finished, read_metrics


def check_adapter_folder(recipe: Recipe, key: str, folder: str | Path, fix: str) -> Path:
    """An earlier stage's output, checked: an adapter is there, made for this base and template.
    `key` names the recipe key that pointed here; `fix` says how to make the folder."""
    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        raise RecipeError(f"{recipe.source}: {key}: no adapter at {path}; {fix}")
    damaged = f"the output is damaged; {fix}"
    read_json(path / "adapter_config.json", damaged)
    if (path / "adapter_model.safetensors").is_file():
        check_safetensors(path / "adapter_model.safetensors", damaged)
    try:
        made = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise DamagedFileError(f"{path / 'recipe.yaml'}: damaged (not valid YAML); {damaged}") from None
    made = made if isinstance(made, dict) else {}
    for part, ours in (("model", recipe.model.name_or_path), ("template", recipe.template.name)):
        theirs = (made.get(part) or {}).get("name_or_path" if part == "model" else "name")
        if theirs != ours:
            raise RecipeError(
                f"{recipe.source}: {key}: {path} was trained with {part} {theirs!r}, this recipe uses {ours!r}; "
                "point it at an output of the same base model and template"
            )
    return path


def adapter_chain(folder: str | Path) -> list[str]:
    """The adapters that make a stage output's model, in merge order: the ones it was trained on top
    of (recorded as `start_from` in its metrics.json), then its own."""
    start = read_metrics(folder).get("start_from", [])
    return [*(_relocated(p, Path(folder)) for p in start), str(folder)]


def _relocated(recorded: str, folder: Path) -> str:
    """A recorded start adapter that no longer exists at its path but sits beside `folder` under the
    same name (the output folder was moved or copied as a whole, e.g. to another machine)."""
    beside = folder.parent / Path(recorded).name
    if not Path(recorded).is_dir() and (beside / "adapter_config.json").is_file():
        return str(beside)
    return recorded


def start_chain(recipe: Recipe, stage: str, key: str = "start_from") -> list[str]:
    """The checked adapter chain a stage's `key` names (its default: the earlier stage's output; `none`:
    no adapter, an empty chain)."""
    folder = recipe.input_dir(stage, key)
    if folder is None:
        return []
    earlier = STAGES[stage].default_input(key)
    check_adapter_folder(
        recipe,
        f"{stage}.{key}",
        folder,
        f"run `finetune {earlier or STAGES.chat_model_stages()[0]} {recipe.source}` first (or run the stage that makes "
        "it first and point "
        f"{stage}.{key} at its output), or set {stage}.{key} to none",
    )
    return adapter_chain(folder)


def chat_model_stage(recipe: Recipe, wanted: str, key: str) -> str:
    """The stage whose model is served (exported, chatted with, benchmarked): `wanted`, checked to be finished,
    or with "auto" the last finished chat-model stage in pipeline order. `key` names the recipe key `wanted`
    came from, for the messages."""
    if wanted != "auto":
        if not finished(recipe, wanted):
            raise RecipeError(
                f"{recipe.source}: {key}: {wanted} has no finished output in "
                f"{recipe.stage_dir(wanted)}; run `finetune {wanted} {recipe.source}` first"
            )
        return wanted
    chat = STAGES.chat_model_stages()
    for stage in reversed(chat):
        if finished(recipe, stage):
            return stage
    names = f"{', '.join(chat[:-1])} or {chat[-1]}" if len(chat) > 1 else chat[0]
    raise RecipeError(
        f"{recipe.source}: {key}: no finished {names} output under {recipe.output_dir}; run "
        f"`finetune {chat[0]} {recipe.source}` (or `finetune pipeline {recipe.source}`) first"
    )


def model_chain(recipe: Recipe, stage: str, key: str) -> list[str]:
    """The adapters that make `stage`'s model, in merge order, each checked (present, same base and template);
    `key` names the recipe key that chose the stage, for the messages."""
    chain = adapter_chain(recipe.stage_dir(stage))
    for folder in chain:
        check_adapter_folder(recipe, key, folder, f"it is part of {stage}'s chain; rerun the stage that makes it")
    return chain


def fp32_recipe(recipe: Recipe) -> Recipe:
    """The recipe loading the base in fp32 and unquantised: merging happens at full precision."""
    return recipe.model_copy(
        update={"precision": "fp32", "model": recipe.model.model_copy(update={"load_in_4bit": False})}
    )
