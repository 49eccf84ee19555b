"""SIGTERM ends a run like Ctrl-C, and where a training loop can, after a checkpoint.

SIGTERM is what Azure ML sends a low-priority node before it takes it back, and what job schedulers (Slurm,
Kubernetes) send before a kill. Without a handler Python dies at once with no message and no checkpoint.
Here, while a training loop runs (`checkpointable`), the first SIGTERM asks it to stop: at the end of the
current step it saves a checkpoint and raises `Terminated`, so the rerun continues from there. Outside a
loop, or at a second SIGTERM, `Terminated` is raised at once, as Ctrl-C raises KeyboardInterrupt. Either way
the command prints one line and exits with 143 (the shell's 128 + SIGTERM).

Under several processes each rank may receive the signal at a different moment; `stop_now` agrees across
ranks (any rank asked: every rank stops after the same step), so their checkpoint collectives match.
"""

from __future__ import annotations

import contextlib
import logging
import signal

from . import distributed

log = logging.getLogger(__name__)

TERMINATED = 143  # the shell's 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM). A KeyboardInterrupt, so every place that cleans up after Ctrl-C
    cleans up after it too."""


_requested = False
_loops = 0


def _handler(signum, frame):
    global _requested
    if _requested or not _loops:
        raise Terminated()
    _requested = True
    log.warning("SIGTERM: stopping after this step, once a checkpoint is saved (a second SIGTERM stops at once)")


def install() -> None:
    """Handle SIGTERM in this process (the main thread only can; elsewhere nothing changes)."""
    global _requested
    _requested = False
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    return _requested


@contextlib.contextmanager
def checkpointable():
    """A training loop that checks `stop_now` after each step and checkpoints before it stops."""
    global _loops
    _loops += 1
    try:
        yield
    finally:
        _loops -= 1


def stop_now(device=None) -> bool:
    """Whether the loop should checkpoint and stop now: this process was asked, or (launched) any process was."""
    if distributed.world_size() == 1:
        return _requested
    return bool(distributed.all_mean({"stop": float(_requested)}, device)["stop"] > 0)
