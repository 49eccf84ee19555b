"""What an output is made from, as content: the recipe's settings that shape it, the data's bytes, the base
weights, the template's text and the adapters it was trained on top of. A stage records it in its
metrics.json (`made_from`, and its digest `fingerprint`); `finetune pipeline` recomputes it before each stage
and reruns a stage whose fingerprint changed (and so every stage after it, whose inputs then changed), saying
what changed. The same hashes check an adapter chain when it is read (core.lineage).

Hashing a multi-GB base or data file on every pipeline run would cost seconds to minutes, so a file's hash is
kept in `<output_dir>/.finetune-hashes.json` under its path, size and modification time, and recomputed only
when one of them changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from finetune.recipe import BUILTIN_PREFIX, STAGES, Recipe

HASH_CACHE = ".finetune-hashes.json"

# Keys that say how a run saves, logs, resumes or spends memory, not what it makes: a change to them leaves an
# output up to date. Everything else in a stage's section and the shared settings is part of what it is made from.
NOT_PART_OF_THE_RESULT = {
    "resume",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "save_every",
    "save_only_model",
    "logging_strategy",
    "logging_first_step",
    "logging_dir",
    "disable_tqdm",
    "run_name",
    "dataloader_num_workers",
    "dataloader_prefetch_factor",
    "dataloader_persistent_workers",
    "dataloader_pin_memory",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "hub_private",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "micro_batch_size",
    "per_device_eval_batch_size",
    "eval_accumulation_steps",
    "force",
    "output",
    "data",  # recorded as the data's content
    "start_from",  # recorded as the adapters' content
    "reward_from",
}


def sha256_file(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class Hashes:
    """sha256 of files, remembered under (path, size, mtime) in `<folder>/.finetune-hashes.json` (None: not kept)."""

    def __init__(self, folder: str | Path | None = None):
        self.path = Path(folder) / HASH_CACHE if folder is not None else None
        self.known: dict = {}
        if self.path is not None and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.known = {}
        self.changed = False

    def file(self, path: str | Path) -> str | None:
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError:
            return None
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.known:
            self.known[key] = sha256_file(path)
            self.changed = True
        return self.known[key]

    def tree(self, folder: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
        """One hash of every file under `folder` (names and contents; hidden files and finetune's marks left out)."""
        folder = Path(folder)
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and (suffixes is None or p.suffix in suffixes)
        )
        return digest([(p.relative_to(folder).as_posix(), self.file(p)) for p in files])

    def save(self) -> None:
        if self.path is None or not self.changed or not self.path.parent.is_dir():
            return
        tmp = self.path.with_name(f"{HASH_CACHE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.path)
        except OSError:  # a cache: never the reason a run fails
            pass


WEIGHT_FILES = (".safetensors", ".bin", ".json", ".model", ".txt")


def base_weights(recipe: Recipe, hashes: Hashes) -> dict:
    """The base model's identity: its name and revision, and the content of its files when they are local (the
    shipped builtin, a local folder): weights changed at the same path are a different base."""
    from finetune.tiny import base_path

    name = recipe.model.name_or_path
    out = {"name": name, "revision": recipe.model.revision, "load_in_4bit": recipe.model.load_in_4bit}
    folder = base_path() if name.startswith(BUILTIN_PREFIX) else Path(recipe.model_path())
    if folder.is_dir():
        out["sha256"] = hashes.tree(folder, WEIGHT_FILES)
    return out


def data_content(recipe: Recipe, sources) -> list[dict]:
    """Each data source as what it holds: a local file's or folder's content hash, a hub dataset's id, config,
    split (its content lives on the hub). Weights and formats are settings and recorded with them."""
    from .data import local_source

    out = []
    for source in sources:
        entry = source.model_dump(mode="json")
        try:
            local = local_source(source, recipe)
        except Exception:  # a missing file: the stage itself names it when it runs
            local = None
        if local is not None:
            entry["path"] = None  # where it lies is not what it is: a moved file is the same data
            entry["sha256"] = hashes_for(recipe).tree(local) if local.is_dir() else hashes_for(recipe).file(local)
        out.append(entry)
    return out


_hashes: dict[str, Hashes] = {}


def hashes_for(recipe: Recipe) -> Hashes:
    """The hash cache of the recipe's output_dir (one per process)."""
    key = str(Path(recipe.output_dir).expanduser().resolve())
    if key not in _hashes:
        _hashes[key] = Hashes(key)
    return _hashes[key]


def adapter_hash(folder: str | Path) -> str | None:
    """The content of a stage output's adapter (its weights and config), or None where it has none."""
    folder = Path(folder)
    weights = sha256_file(folder / "adapter_model.safetensors")
    if weights is None:
        return None
    return digest([weights, adapter_config_digest(folder / "adapter_config.json")])


# PEFT keeps these as sets and writes them as lists in the process's set order (which PYTHONHASHSEED varies):
# the same adapter saved by two processes, or two nodes, lists them in different orders.
SET_VALUED = ("target_modules", "modules_to_save", "exclude_modules", "layers_to_transform")


def adapter_config_digest(path: Path) -> str | None:
    """The content of an adapter_config.json, independent of key order and of the order of PEFT's set-valued
    lists (SET_VALUED)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return sha256_file(path)  # unreadable as JSON: its bytes (the adapter's loader will say what is wrong)
    if isinstance(config, dict):
        for key in SET_VALUED:
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key], key=str)
    return digest(config)


def adapter_record(adapter: str | Path, output: str | Path) -> dict:
    """How a stage output names an adapter it was made from: relative to the output folder (a run folder moved
    or copied as a whole keeps working), absolute as a fallback, and the adapter's content hash (checked when
    read: core.lineage)."""
    adapter, output = Path(adapter).resolve(), Path(output).resolve()
    return {"path": os.path.relpath(adapter, output), "absolute": str(adapter), "sha256": adapter_hash(adapter)}


# Shared settings that `settings` records under another name than their recipe key (renaming them would change
# every recorded fingerprint): `changes` names them by the key a user sets.
RECIPE_KEYS = {"processes": "launch.num_processes", "accelerate_config": "launch.accelerate_config"}


def settings(recipe: Recipe, stage: str) -> dict:
    """The recipe's settings that shape `stage`'s output (NOT_PART_OF_THE_RESULT left out)."""
    section = recipe.section(stage)
    own = section.model_dump(mode="json") if section is not None else {}
    own = {k: v for k, v in own.items() if k not in NOT_PART_OF_THE_RESULT}
    entry = STAGES[stage]
    if entry.model_choice:  # which model it takes ("auto" or a stage) is the adapters it read, under `inputs`:
        own.pop(entry.model_choice, None)  # export.stage=auto and the stage auto picks make the same output
    shared = {
        "model": {k: v for k, v in recipe.model.model_dump(mode="json").items() if k != "name_or_path"},
        "lora": recipe.lora.model_dump(mode="json"),
        "precision": recipe.precision,
        "seed": recipe.seed,
        "deepspeed": hashes_for(recipe).file(recipe.resolve_path(recipe.deepspeed)) if recipe.deepspeed else None,
        "processes": recipe.launch.num_processes,
        "accelerate_config": (
            hashes_for(recipe).file(recipe.resolve_path(recipe.launch.accelerate_config))
            if recipe.launch.accelerate_config
            else None
        ),
    }
    if entry.trl_config:
        shared["training"] = {k: v for k, v in recipe.training.items() if k not in NOT_PART_OF_THE_RESULT}
    if entry.chat_model or entry.takes_models:
        shared["samples"] = {k: v for k, v in recipe.samples.model_dump(mode="json").items() if k != "data"}
    return {stage: own, **shared}


def made_from(recipe: Recipe, stage: str, inputs: dict[str, list[dict]], template_text: str) -> dict:
    """Everything `stage`'s output is made from (see the module docstring). `inputs`: each key that names earlier
    outputs (start_from, reward_from, the model an export merges) -> their adapter records, in merge order."""
    section = recipe.section(stage)
    hashes = hashes_for(recipe)
    data = {}
    if STAGES[stage].has_data and section is not None:
        data = {split: data_content(recipe, getattr(section.data, split)) for split in ("train", "eval")}
    if (STAGES[stage].chat_model or STAGES[stage].takes_models) and recipe.samples.data:
        data["samples"] = data_content(recipe, recipe.samples.data)
    made = {
        "settings": settings(recipe, stage),
        "data": data,
        "base": base_weights(recipe, hashes),
        "template": {"name": recipe.template.name, "sha256": hashlib.sha256(template_text.encode()).hexdigest()},
        "inputs": {key: [r.get("sha256") for r in records] for key, records in inputs.items()},
    }
    hashes.save()
    return made


def changes(old: dict, new: dict, stage: str) -> list[str]:
    """What differs between two `made_from` records, in recipe words ("sft.learning_rate: 0.002 -> 0.001", "the
    data of sft.data.train changed", "its input start_from was made again")."""

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    said, out = set(), []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        part, _, rest = key.partition(".")
        if part == "settings":
            out.append(f"{RECIPE_KEYS.get(rest, rest)}: {_short(a.get(key))} -> {_short(b.get(key))}")
        elif part == "data":
            split = rest.split(".")[0]  # train, eval, or the samples' prompts (the recipe's samples.data)
            what = "the data of samples.data" if split == "samples" else f"the data of {stage}.data.{split}"
            if what not in said:
                said.add(what)
                out.append(f"{what} changed")
        elif part == "base" and "base" not in said:
            said.add("base")
            out.append(f"the base model changed ({recipe_name(a, b)})")
        elif part == "template" and "template" not in said:
            said.add("template")
            out.append("the chat template changed")
        elif part == "inputs":
            reads = {"start_from": "the adapters it starts from", "reward_from": "the reward model it scores with"}
            key = rest.split(".")[0]
            what = f"{stage}.{key} ({reads.get(key, 'the model it takes')}) was made again"
            if what not in said:
                said.add(what)
                out.append(what)
    return out


def recipe_name(old: dict, new: dict) -> str:
    before, after = old.get("base.name"), new.get("base.name")
    return f"{before} -> {after}" if before != after else "its files' content"


def _short(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    return json.dumps(value)
