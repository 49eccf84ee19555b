"""Which process am I, and what do the others hold: the one place every stage asks.

Who writes what, on one node or several (docs/azureml.md, "Several nodes"): an output folder is either shared
by every node (a network file system, an Azure ML datastore mount) or each node's own disk (Azure ML runs the
job in a node-local copy of the code snapshot, so `runs/...` is node-local). `writes_output(folder)` is true
for the process of global rank 0 and, when `folder` is node-local, for local rank 0 of every other node: each
node then holds complete stage outputs and checkpoints, so the stages after it and a resumed run find their
inputs on their own disk. Which case holds is found out, not configured: rank 0 writes a probe file and every
process looks for it (`shares_main_folder`).

Rank and world size come from torch.distributed once it is initialised (every launcher we use
initialises it before training), else from the launcher's environment (RANK / WORLD_SIZE, set by
`accelerate launch`, torchrun and Azure ML's PyTorch distribution), else a single process. accelerate's
PartialState is not asked: under its DeepSpeed launcher on CPU (accelerate 1.15) it reports rank 0 of 1
on every process, which once made two processes write the same checkpoint.
"""

from __future__ import annotations

import os


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its node (LOCAL_RANK, set by every launcher we use), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_local_main() -> bool:
    return local_rank() == 0


_shared: dict[str, bool] = {}
PROBE = ".node-probe-"


def shares_main_folder(folder) -> bool:
    """Whether this process sees the global main process's `folder` (the same folder, not one of the same name
    on another disk). A collective the first time for a folder: every process must call it at the same point.
    Rank 0 creates `folder` and a probe file with a fresh name in it; after a barrier each process looks for it
    (a name never looked up before cannot be in an NFS client's negative lookup cache); then it is removed."""
    from pathlib import Path

    folder = Path(folder)
    key = str(folder)
    if key in _shared:
        return _shared[key]
    if _dist() is None:
        _shared[key] = True
        return True
    import uuid

    token = broadcast_from_main(uuid.uuid4().hex if is_main() else None)
    probe = folder / f"{PROBE}{token}"
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    barrier()
    _shared[key] = probe.is_file()
    barrier()
    if is_main():
        probe.unlink()
    if not _shared[key] and is_local_main():
        folder.mkdir(parents=True, exist_ok=True)
    return _shared[key]


def writes_output(folder) -> bool:
    """Whether this process writes the stage outputs and checkpoints under `folder`: global rank 0, and local
    rank 0 of a node whose `folder` is its own (see the module docstring). A collective the first time for a
    folder (shares_main_folder)."""
    shared = shares_main_folder(folder)
    return is_main() or (is_local_main() and not shared)


def node_local(folder) -> bool:
    """Whether some process sees another `folder` than rank 0 (node-local disks): then every node writes its own
    copy. The same answer on every process (a collective the first time for a folder)."""
    shared = shares_main_folder(folder)
    dist = _dist()
    if dist is None:
        return False
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, shared)
    return not all(every)


def same_on_every_process(value, what: str) -> None:
    """Stop every process with one message when they do not agree on `value` (e.g. which checkpoint to resume:
    with node-local folders a node may lack one that another node has)."""
    dist = _dist()
    if dist is None:
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    if any(v != every[0] for v in every):
        from finetune.errors import UserError

        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(every))
        raise UserError(
            f"the processes disagree on {what} ({seen}). With an output folder on each node's own disk, every node "
            "must hold the same checkpoints; copy the missing ones to that node, or set resume=false to start over"
        )


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def all_mean(values: dict[str, float], device) -> dict[str, float]:
    """Mean of each figure over the processes (identity with one process)."""
    import torch

    dist = _dist()
    if dist is None or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def all_sum_(tensor) -> None:
    """Sum a tensor over the processes, in place (nothing with one process)."""
    dist = _dist()
    if dist is not None:
        dist.all_reduce(tensor)


def all_equal(value: str) -> bool:
    """Whether every process holds the same string (e.g. a digest of its weights)."""
    dist = _dist()
    if dist is None:
        return True
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return len(set(every)) == 1


def broadcast_from_main(value):
    """The main process's value on every process (a collective: every process must call it)."""
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int) -> list[int]:
    """This process's share of `n` items (every world_size-th, from its rank)."""
    return list(range(rank(), n, world_size()))
