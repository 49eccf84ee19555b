"""Resuming a stage: which checkpoint, and whether it belongs to this run. One set of rules for every
stage (the TRL-trained ones and PPO).

- A checkpoint counts only when complete. The HF Trainer writes `trainer_state.json` last (after the
  adapter, optimiser, scheduler and RNG state: transformers Trainer._save_checkpoint), so a folder without
  it was cut short; every weight and state file is also checked (core.integrity) for truncation and for
  pickled code. PPO's checkpoints are renamed into place once written (finetune.rl.checkpoints) and are
  checked the same way. Resume takes the newest complete checkpoint and says which, and which it skipped.
- A checkpoint continues only the run that made it. `<stage>-checkpoints/run_identity.json` records the
  run: base model, template (name and text), LoRA, precision, seed, the adapters it started from, a
  fingerprint of the training rows and every training setting. Resuming with any of them changed is
  refused with the differences named; `<stage>.resume=false` starts over (and clears the old checkpoints,
  which would otherwise be taken for this run's). Settings that only say how long to train or how to
  save, log and evaluate (MAY_CHANGE) may change: extending max_steps is how one continues a run.
- A checkpoint past the length asked for (max_steps / num_train_epochs / ppo.updates lowered below it)
  is refused: the run would train nothing and report a longer run as this one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from finetune.recipe import STAGES, Recipe, RecipeError

from . import distributed, ownership
from .fingerprints import base_weights, hashes_for, sha256_file
from .integrity import dcp_metadata_problem, safetensors_problem, torch_file_problem
from .modeling import template_for
from .outputs import write_json

log = logging.getLogger(__name__)

IDENTITY = "run_identity.json"

# Keys that may change between a run and its resumption: how long to train, how often to save or log,
# how to evaluate, and how to trade memory for compute without changing the math (recomputing
# activations; PPO's micro-batches), which is what the memory check suggests when a rerun would not fit.
# Everything else in a stage's settings is part of the run's identity.
MAY_CHANGE = {
    "resume",
    "padding_free",  # exact either way (the same loss and gradients), only faster
    "eval_prompts",
    "gradient_checkpointing",
    "gradient_checkpointing_kwargs",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "micro_batch_size",
    "eval_generate_rows",
    "max_new_tokens",
    "max_steps",
    "num_train_epochs",
    "updates",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "save_every",
    "save_only_model",
    "per_device_eval_batch_size",
    "eval_steps",
    "eval_accumulation_steps",
    "logging_strategy",
    "logging_first_step",
    "logging_dir",
    "run_name",
    "disable_tqdm",
    "dataloader_num_workers",
    "dataloader_prefetch_factor",
    "dataloader_persistent_workers",
    "dataloader_pin_memory",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
}
# Parts of a section that the identity records in another form (rows fingerprint, adapter hashes).
RECORDED_ELSEWHERE = {"data", "start_from", "reward_from"}


def data_fingerprint(rows: list[dict]) -> dict:
    """How many training rows, and a sha256 of their content in order (where each came from is left out:
    the same rows read from a moved file are the same data)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps({k: v for k, v in row.items() if k != "where"}, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return {"rows": len(rows), "sha256": h.hexdigest()}


def run_identity(recipe: Recipe, stage: str, rows: list[dict], adapters: list[str | None] = ()) -> dict:
    """What a checkpoint must match to be resumed by this run (see the module docstring)."""
    section = recipe.section(stage)
    own = section.model_dump(mode="json", exclude=RECORDED_ELSEWHERE)
    shared = recipe.training if STAGES[stage].trl_config else {}  # `training` feeds the TRL configs only
    settings = {k: v for k, v in {**shared, **own}.items() if k not in MAY_CHANGE}
    template = template_for(recipe).source
    return {
        # the base's files' content too: weights changed at the same path are another base (core.fingerprints)
        "model": base_weights(recipe, hashes_for(recipe)),
        "template": {"name": recipe.template.name, "sha256": hashlib.sha256(template.encode()).hexdigest()},
        "lora": recipe.lora.model_dump(mode="json"),
        "precision": recipe.precision,
        # the config's content, not only its name: ZeRO's stage and partitioning decide how the optimiser state
        # was saved, and DeepSpeed fails on a checkpoint of another layout with its own traceback
        "deepspeed": recipe.deepspeed,
        "deepspeed_sha256": sha256_file(recipe.resolve_path(recipe.deepspeed)) if recipe.deepspeed else None,
        # processes change the global batch, and ZeRO partitions the optimiser state by process
        "processes": distributed.world_size(),
        "seed": recipe.seed,
        "adapters": {str(f): sha256_file(Path(f) / "adapter_model.safetensors") for f in adapters if f},
        "data": data_fingerprint(rows),
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("data",):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _show(value) -> str:
    if isinstance(value, dict) and set(value) == {"rows", "sha256"}:
        return f"{value['rows']} rows (sha256 {value['sha256'][:12]})"
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return f"sha256 {value[:12]}"
    return json.dumps(value) if value is not None else "not recorded"


def differences(stage: str, old: dict, new: dict) -> list[str]:
    """What differs between two identities, in recipe words ("sft.learning_rate: 0.002 -> 0.001")."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        name = key
        if key.startswith("settings."):
            name = f"{stage}.{key[len('settings.') :]}"
        elif key == "data":
            name = f"{stage}.data (the training rows)"
        elif key.startswith("adapters."):
            name = f"start adapter {key[len('adapters.') :]}"
        elif key.startswith("template."):
            name = "template " + ("(its text)" if key.endswith("sha256") else "name")
        elif key.startswith("model."):
            name = key
        elif key == "deepspeed_sha256":
            name = "deepspeed (the config file's content)"
        elif key == "processes":
            name = "processes (launch.num_processes, or the accelerate config's num_processes x machines)"
        out.append(f"{name}: {_show(a.get(key))} -> {_show(b.get(key))}")
    return out


def _number(folder: Path) -> int:
    return int(re.search(r"(\d+)$", folder.name).group(1))


def checkpoints_in(root: Path, prefix: str) -> list[Path]:
    """Checkpoint folders `<prefix>N` under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(re.escape(prefix) + r"\d+", p.name)]
    return sorted(found, key=_number, reverse=True)


# ----------------------------------------------------------------------------- HF Trainer checkpoints

# What DeepSpeed pickles in its checkpoint files beyond tensors (it loads them with weights_only=False,
# deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py): these classes, nothing callable else.
DEEPSPEED_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _trusted_classes() -> list:
    """Classes a checkpoint may pickle besides torch's allowlist: the numpy RNG state the Trainer saves
    (transformers.trainer_pt_utils.safe_globals allows the same) and DeepSpeed's own state classes."""
    import importlib

    import numpy as np

    trusted = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module, name in DEEPSPEED_CLASSES:
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type):
            trusted.append(obj)
    return trusted


def hf_checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when it is complete."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (written last): the run stopped while saving it"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "trainer_state.json is damaged (not valid JSON)"
    if step != _number(folder):
        return f"trainer_state.json says step {step}, the folder name says {_number(folder)}"
    deepspeed = (folder / "latest").is_file() or any(folder.glob("global_step*"))
    # FSDP with sharded state dicts: each process's share of the model and optimiser in torch.distributed
    # .checkpoint folders (pytorch_model_fsdp_0/, optimizer_0/: accelerate's save_fsdp_model / _optimizer)
    fsdp = (folder / "pytorch_model_fsdp_0").is_dir()
    needed = ["optimizer.pt", "scheduler.pt"] if not deepspeed else []
    if fsdp:
        needed = ["optimizer_0/.metadata", "pytorch_model_fsdp_0/.metadata", "scheduler.pt"]
    elif not any((folder / w).is_file() for w in ("adapter_model.safetensors", "model.safetensors")):
        needed.append("adapter_model.safetensors")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        return f"no {', '.join(missing)}: incomplete"
    if deepspeed:
        if not (folder / "latest").is_file():
            return "DeepSpeed's `latest` file (written after its states) is missing: the save did not finish"
        tag = (folder / "latest").read_text().strip()
        if not (folder / tag).is_dir():
            return f"DeepSpeed's `latest` names {tag}, which is missing"
    trusted = _trusted_classes()
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".safetensors":
            problem = safetensors_problem(f)
        elif f.suffix in (".pt", ".pth"):
            problem = torch_file_problem(f, trusted)
        elif f.name == ".metadata":  # a torch.distributed.checkpoint index: a plain pickle
            problem = dcp_metadata_problem(f)
        else:  # training_args.bin is a pickle of TrainingArguments that resuming never loads
            continue
        if problem:
            return f"{f.relative_to(folder)}: {problem}"
    return None


def hf_beyond(recipe: Recipe, stage: str, args):
    """A check that a Trainer checkpoint is not past the length this run asks for."""

    def beyond(folder: Path) -> str | None:
        state = json.loads((folder / "trainer_state.json").read_text())
        if args.max_steps > 0 and state["global_step"] > args.max_steps:
            return f"it is at step {state['global_step']}, past {stage}.max_steps {args.max_steps}"
        if args.max_steps <= 0 and (state.get("epoch") or 0) > args.num_train_epochs + 1e-6:
            return f"it is at epoch {state['epoch']:.3g}, past {stage}.num_train_epochs {args.num_train_epochs}"
        return None

    return beyond


# ----------------------------------------------------------------------------- the decision


def choose_checkpoint(
    recipe: Recipe,
    stage: str,
    resume: bool | str,
    identity: dict,
    prefix: str = "checkpoint-",
    problem=hf_checkpoint_problem,
    beyond=None,
) -> Path | None:
    """The checkpoint this run continues from (None: start from scratch), after the checks in the module
    docstring. Every process reaches the same answer; only the main one writes (the identity file, or the
    clean-up of `resume: false`)."""
    root = recipe.checkpoint_dir(stage)
    marker = root / IDENTITY
    main = distributed.writes_output(root.parent)  # one writer per node when each node has its own folder
    kind = ownership.checkpoints_kind(stage)
    ownership.check_target(root, kind, f"Set output_dir to another folder, or move {root} away yourself")
    chosen = _choose(recipe, stage, resume, identity, root, marker, main, kind, prefix, problem, beyond)
    # every process must continue from the same checkpoint; with node-local folders a node may lack it
    distributed.same_on_every_process(chosen.name if chosen else None, f"which {stage} checkpoint to resume from")
    return chosen


def _choose(recipe, stage, resume, identity, root: Path, marker: Path, main: bool, kind, prefix, problem, beyond):
    if isinstance(resume, str):
        chosen = Path(resume)
        if not chosen.is_dir():
            raise RecipeError(f"{recipe.source}: {stage}.resume: checkpoint folder not found: {resume}")
        why = problem(chosen)
        if why:
            raise RecipeError(
                f"{recipe.source}: {stage}.resume: {chosen} cannot be resumed from: {why}; name a complete "
                f"checkpoint, set {stage}.resume=true (the newest complete one) or false (start over)"
            )
        recorded = chosen.parent / IDENTITY
        if recorded.is_file() and main:
            diff = differences(stage, json.loads(recorded.read_text()), identity)
            if diff:  # named explicitly: the user's choice, but not silently
                log.warning("%s: resuming from %s although it was made with: %s", stage, chosen, "; ".join(diff))
        _refuse_beyond(recipe, stage, chosen, beyond)
        _record(root, identity, main, kind)  # the checkpoints this run saves in root are this run's
        log.info("resuming %s from %s (named by %s.resume)", stage, chosen, stage)
        return chosen
    candidates = checkpoints_in(root, prefix)
    if not resume:
        if main and root.exists():
            ownership.clear(root, kind)
            log.info("%s.resume is false: starting over; removed the earlier checkpoints in %s", stage, root)
        _record(root, identity, main, kind)
        return None
    skipped, chosen = [], None
    for folder in candidates:
        why = problem(folder)
        if why is None:
            chosen = folder
            break
        skipped.append(f"{folder.name} ({why})")
    if skipped and main:
        log.warning("%s: skipped incomplete or damaged checkpoints: %s", stage, "; ".join(skipped))
    if chosen is None:
        if skipped and main:
            log.warning("%s: no complete checkpoint in %s: starting from the beginning", stage, root)
        _record(root, identity, main, kind)
        return None
    if not marker.is_file():
        raise RecipeError(
            f"{recipe.source}: {stage}.resume: {root} holds checkpoints but no {IDENTITY}, so nothing says which "
            f"run they belong to; set {stage}.resume=false to start over, or name one as {stage}.resume=<path>"
        )
    diff = differences(stage, json.loads(marker.read_text()), identity)
    if diff:
        raise RecipeError(
            f"{recipe.source}: {stage}.resume: the checkpoints in {root} belong to a run with other inputs: "
            + "; ".join(diff)
            + f". Continuing it would train the new values on top of the old run as if they had been used from "
            f"the start. Set {stage}.resume=false to start over (its checkpoints are removed), or restore those "
            "values to continue it"
        )
    _refuse_beyond(recipe, stage, chosen, beyond)
    log.info(
        "resuming %s from %s (the newest complete checkpoint%s)",
        stage,
        chosen,
        f"; skipped {', '.join(s.split(' ')[0] for s in skipped)}" if skipped else "",
    )
    return chosen


def _refuse_beyond(recipe: Recipe, stage: str, chosen: Path, beyond) -> None:
    why = beyond(chosen) if beyond else None
    if why:
        raise RecipeError(
            f"{recipe.source}: {stage}.resume: the checkpoint {chosen} cannot continue this run: {why}, so there is "
            f"nothing left to train. Raise the length again to continue it, or set {stage}.resume=false to start over"
        )


def _record(root: Path, identity: dict, main: bool, kind: str) -> None:
    if main:
        if not root.exists():
            root.mkdir(parents=True)
            ownership.mark(root, kind)
        write_json(root / IDENTITY, identity)
