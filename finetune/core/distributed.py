"""Which process am I, and what do the others hold: the one place every stage asks.

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
