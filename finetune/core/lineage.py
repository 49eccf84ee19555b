"""Lineage: which adapters make a stage output's model, and what every output is made from.

A stage output records the adapters it was trained on top of (`start_from` in its metrics.json: each relative
to the output folder, with its content hash); its model is those merged into the base in order, then its own
adapter. Training stages start from such a chain; export and chat merge one; PPO shares one between its policy
and reward model. Each output also records what it was made from (`made_from`, `fingerprint`: settings, data,
base, template and those adapters' content; core.fingerprints), which `finetune pipeline` compares to decide
whether it is still up to date. Nothing is read from a stage another process is writing.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.recipe import STAGES, Recipe, RecipeError

from . import fingerprints
from .fingerprints import adapter_hash, adapter_record
from .integrity import DamagedFileError, check_safetensors, read_json
from .locks import describe, held, target_lock
from .modeling import template_for
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
    """The adapters that make a stage output's model, in merge order: the ones it was trained on top of
    (recorded as `start_from` in its metrics.json), then its own. Each recorded adapter is found relative to
    `folder` (a run folder moved or copied as a whole keeps working), else at its absolute path, and must hold
    the content it was trained on (its sha256): an adapter changed or replaced since is refused, never merged."""
    folder = Path(folder)
    return [*(str(recorded_adapter(r, folder)) for r in read_metrics(folder).get("start_from", [])), str(folder)]


def recorded_adapter(record, folder: Path) -> Path:
    """Where a recorded start adapter is now, checked against its recorded content."""
    if isinstance(record, str):  # written before adapters were recorded with their content: the path alone
        recorded = Path(record)
        beside = folder.parent / recorded.name
        return beside if not recorded.is_dir() and (beside / "adapter_config.json").is_file() else recorded
    candidates = [(folder / record["path"]).resolve(), Path(record["absolute"])]
    found = next((c for c in candidates if (c / "adapter_config.json").is_file()), None)
    if found is None:
        raise RecipeError(
            f"{folder}: it was trained on top of the adapter at {candidates[0]} (recorded {record['absolute']}), "
            "which is not there any more; restore it, or run the stages again (finetune pipeline RECIPE)"
        )
    now = adapter_hash(found)
    if record.get("sha256") and now != record["sha256"]:
        raise RecipeError(
            f"{folder}: it was trained on top of {found} as it was then (sha256 {record['sha256'][:12]}), and that "
            f"adapter has changed since (sha256 {str(now)[:12]}): the stage that made it ran again, or the folder "
            "was replaced. Merging it would make a different model than the one measured; run this stage again "
            "(finetune pipeline RECIPE reruns every stage whose inputs changed)"
        )
    return found


def start_chain(recipe: Recipe, stage: str, key: str = "start_from") -> list[str]:
    """The checked adapter chain a stage's `key` names (its default: the earlier stage's output; `none`:
    no adapter, an empty chain)."""
    folder = recipe.input_dir(stage, key)
    if folder is None:
        return []
    earlier = recipe.input_stage(stage, key)
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


# ----------------------------------------------------------------------------- what an output is made from


def input_keys(stage: str) -> list[str]:
    """The section keys through which `stage` reads earlier outputs: its keyed inputs (start_from, reward_from)
    and, for a stage that takes a model (export, eval), the key that chooses it."""
    entry = STAGES[stage]
    keys = list(dict.fromkeys(k for k in entry.inputs.values() if k))
    return keys + ([entry.model_choice] if entry.takes_models and entry.model_choice else [])


def upstream(recipe: Recipe, stage: str) -> dict[str, list[str]]:
    """The earlier outputs `stage` reads, as the recipe points at them now: key -> folders in merge order (a
    start_from's adapter chain; the model export merges; for eval the export folder itself when it scores it).
    A key pointing at nothing yet (the earlier stage has not run) gives []."""
    entry, section = STAGES[stage], recipe.section(stage)
    out = {}
    for key in input_keys(stage):
        if key == entry.model_choice and entry.takes_models:
            wanted = getattr(section, key)
            served = STAGES.model_folder_stage()
            if wanted in ("auto", served) and served != stage and finished(recipe, served):
                out[key] = [str(recipe.stage_dir(served))]
                continue
            try:
                if wanted == served:
                    raise RecipeError("not written yet")
                chosen = chat_model_stage(recipe, wanted, f"{stage}.{key}")
            except RecipeError:
                out[key] = []
                continue
            out[key] = adapter_chain(recipe.stage_dir(chosen))
        else:
            folder = recipe.input_dir(stage, key)
            out[key] = adapter_chain(folder) if folder is not None and finished_folder(folder) else []
    return out


def finished_folder(folder: str | Path) -> bool:
    return (Path(folder) / "metrics.json").is_file()


def input_record(folder: str | Path, output: str | Path) -> dict:
    """An earlier output as the new output records it: relative path, absolute path, content (an adapter's
    hash; for a merged model folder, the fingerprint it records)."""
    record = adapter_record(folder, output)
    if record["sha256"] is None:
        record["sha256"] = read_metrics(folder).get("fingerprint")
    return record


def made_from(recipe: Recipe, stage: str, inputs: dict[str, list[str]]) -> dict:
    """What `stage`'s output is made from (core.fingerprints) given the earlier outputs it reads."""
    records = {key: [input_record(f, recipe.stage_dir(stage)) for f in folders] for key, folders in inputs.items()}
    return fingerprints.made_from(recipe, stage, records, template_for(recipe).source)


def stamp(recipe: Recipe, stage: str, metrics: dict, inputs: dict[str, list[str]]) -> dict:
    """`metrics` with what the output is made from: the adapters it started from as records (relative to the
    output, with their content: adapter_chain checks them), `made_from` and its digest `fingerprint` (the
    pipeline's freshness check compares them)."""
    out = recipe.stage_dir(stage)
    stamped = dict(metrics)
    if "start_from" in stamped:
        stamped["start_from"] = [input_record(f, out) for f in stamped["start_from"]]
    made = made_from(recipe, stage, inputs)
    stamped["made_from"] = made
    stamped["fingerprint"] = fingerprints.digest(made)
    return stamped


# ----------------------------------------------------------------------------- outputs being written


def check_not_being_written(recipe: Recipe, stages: list[str], reader: str) -> None:
    """Refuse to read the output of a stage another process is writing right now (its lock is held): a half-run
    stage looks unfinished, so `auto` would silently take an older stage's model instead."""
    for stage in stages:
        folder, name = target_lock(recipe.stage_dir(stage))
        info = held(folder, name)
        if info is not None:
            raise RecipeError(
                f"{recipe.source}: {reader}: the {stage} stage is being written into {recipe.stage_dir(stage)} right "
                f"now ({describe(info)}); wait for it to finish, or stop it, before {reader} reads it"
            )
