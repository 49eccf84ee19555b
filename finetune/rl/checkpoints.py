"""RL checkpoints (PPO, GRPO): `<output_dir>/<stage>-checkpoints/update-N/`, complete or absent.

A checkpoint is written into a staging folder and renamed into place once every file is there (and
flushed to disk), so a run killed mid-save leaves only the hidden staging folder. On several nodes each node
whose output folder is its own disk writes a complete copy (finetune.core.distributed.writes_output). Nothing in it is
unpickled as code: adapter weights and the value head are safetensors, figures are JSON, and optimiser /
RNG state is read with `torch.load(weights_only=True)` (tensors and plain containers only), after
`problem` has checked every file (complete, and no pickled global outside torch's allowlist). Which
checkpoint a run resumes from is decided by finetune.core.resume (the newest that passes `problem`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from finetune.core import distributed, ownership
from finetune.core.integrity import safetensors_problem, torch_file_problem
from finetune.core.outputs import commit_dir, staging_dir, write_json
from finetune.recipe import RecipeError

from .engine import POLICY, VALUE, MultiAdapterModel, RolloutEngine

PREFIX = "update-"


def _rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    import numpy as np

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _update_of(folder: Path) -> int:
    return int(folder.name[len(PREFIX) :])


def problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (missing, truncated or unsafe files), or None when it is complete.
    Run before anything is loaded, so that a damaged checkpoint is skipped, not half-applied."""
    state = folder / "state.json"
    if not state.is_file():
        return "no state.json (written last): incomplete"
    try:
        meta = json.loads(state.read_text())
        update = int(meta["update"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "state.json is damaged"
    if update != _update_of(folder):
        return f"state.json says update {update}, the folder name says {_update_of(folder)}"
    found = safetensors_problem(folder / "weights.safetensors")
    if found:
        return f"weights.safetensors: {found}"
    for name in ("engine.pt", f"rng_{distributed.rank()}.pt"):
        if not (folder / name).is_file():
            return f"no {name}"
        found = torch_file_problem(folder / name)
        if found:
            return f"{name}: {found}"
    return None


def beyond(updates: int, stage: str = "ppo"):
    """A check that a checkpoint is not past `updates` (<stage>.updates lowered below it)."""

    def check(folder: Path) -> str | None:
        update = json.loads((folder / "state.json").read_text())["update"]
        return f"it is at update {update}, past {stage}.updates {updates}" if update > updates else None

    return check


def save(
    root: Path, update: int, model: MultiAdapterModel, engine: RolloutEngine, norm: dict | None, keep: int = 2
) -> None:
    """Adapters, value head (PPO), optimisers, the engine's own state (PPO: beta), reward normalisation and
    every process's RNG state."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # One writer per output folder: rank 0, and local rank 0 of each node whose folder is its own disk
    # (finetune.core.distributed), so every node holds a complete checkpoint: weights and optimiser state from
    # its writer (the same on every process: plain data parallel), the RNG state of each of its processes.
    main = distributed.writes_output(root.parent)
    target = root / f"{PREFIX}{update}"
    # one update-N folder inside the stage's checkpoints folder, `<output_dir>/<stage>-checkpoints` (core.ownership)
    kind = f"checkpoint:{root.name.removesuffix('-checkpoints')}"
    tmp = staging_dir(target, kind, reset=main)
    distributed.barrier()
    torch.save(_rng_state(), tmp / f"rng_{distributed.rank()}.pt")
    if main:
        tensors = {f"policy.{k}": v for k, v in get_peft_model_state_dict(model.peft, adapter_name=POLICY).items()}
        if model.value_head is not None:
            tensors.update(
                {f"value.{k}": v for k, v in get_peft_model_state_dict(model.peft, adapter_name=VALUE).items()}
            )
            tensors.update({f"value_head.{k}": v for k, v in model.value_head.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        torch.save(engine.state_dict(), tmp / "engine.pt")
        write_json(tmp / "state.json", {"update": update, "norm": norm, "world_size": distributed.world_size()})
    distributed.barrier()
    if main:
        commit_dir(tmp, target, kind)
        done = sorted(
            (p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()), key=_update_of
        )
        for old in done[:-keep]:
            ownership.remove(old, kind)
    distributed.barrier()


def load(folder: Path, model: MultiAdapterModel, engine: RolloutEngine, stage: str = "ppo") -> tuple[int, dict | None]:
    """Restore a checkpoint into the model and engine; returns (update, reward normalisation)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    if meta["world_size"] != distributed.world_size():
        raise RecipeError(
            f"{folder}: saved by {meta['world_size']} processes, resumed with "
            f"{distributed.world_size()}; resume with the same process count or set {stage}.resume=false"
        )
    weights = load_file(str(folder / "weights.safetensors"), device=str(engine.device))

    def part(prefix: str) -> dict:
        return {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}

    set_peft_model_state_dict(model.peft, part("policy"), adapter_name=POLICY)
    if model.value_head is not None:
        set_peft_model_state_dict(model.peft, part("value"), adapter_name=VALUE)
        model.value_head.load_state_dict(part("value_head"))
    engine.load_state_dict(torch.load(folder / "engine.pt", map_location=engine.device, weights_only=True))
    _set_rng_state(torch.load(folder / f"rng_{distributed.rank()}.pt", weights_only=True))
    return meta["update"], meta["norm"]
