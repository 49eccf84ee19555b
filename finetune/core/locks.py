"""One run per output: a lock file per stage (and per pipeline) in the output folder.

Two runs of a stage into one output_dir would share its staging, checkpoint and output folders and
silently replace each other's work. Each run therefore holds an exclusive `flock` on
`<output_dir>/.<name>.lock` while it works; the file records who holds it (pid, host, command, start
time) so that a second run can say whom it is waiting for. The kernel drops a flock when its holder
exits, however it exits (SIGKILL included), so a lock left behind by a dead run never blocks: the
file stays, nobody holds it, the next run takes it. flock(2) works on local file systems and on NFS
(Linux emulates it with POSIX byte-range locks there since 2.6.12).

Under `accelerate launch` / torchrun every process of one run shares the lock: only the process of
global rank 0 takes it. The others start nothing before rank 0 has joined them (their first
collective waits for it), and when rank 0 refuses, the launcher stops them.

Standard library only: a process holding a lock needs none of the heavy imports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from finetune.errors import UserError

from .ownership import make_output_dir


class LockedError(UserError):
    """Another live run holds the lock of the same output."""


def lock_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f".{name}.lock"


def target_lock(target: str | Path) -> tuple[Path, str]:
    """(folder, name) of the lock of a write target: `<parent>/.<name>.lock` beside it. For a stage's output in
    the output_dir that is `<output_dir>/.<stage>.lock`; for an export.output elsewhere, beside that folder: every
    write target is locked, not only those inside the output_dir."""
    target = Path(target)
    return target.parent, target.name


def held(output_dir: str | Path, name: str) -> dict | None:
    """Who holds the lock `<output_dir>/.<name>.lock` now (its details), or None when no live process does."""
    path = lock_path(output_dir, name)
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return holder(path) or {"pid": "?"}
        raise
    finally:
        os.close(fd)  # a shared lock taken here is released with the descriptor
    return None


def holder(path: Path) -> dict:
    """What the lock file says about its holder ({} when it says nothing readable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(info: dict) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    launcher = f", launched by pid {info['parent_pid']}" if info.get("launched") else ""
    return (
        f"pid {info.get('pid')} on host {info.get('host')}{launcher}, started {info.get('started')}, "
        f"command: {info.get('command')}"
    )


def takes_lock() -> bool:
    """Whether this process takes the lock: yes unless it is a non-zero rank of a launched run."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def output_lock(output_dir: str | Path, name: str, what: str, fix: str):
    """Hold `<output_dir>/.<name>.lock` for the duration of the block, or raise LockedError naming the
    run that holds it. `what` names the work in the message ("the sft stage"), `fix` says what to do.
    Creating output_dir here is also the first write of a run: an unwritable folder fails now, not after
    the model has loaded."""
    if not takes_lock():
        yield None
        return
    path = lock_path(output_dir, name)
    blocking = next((p for p in (Path(output_dir), *Path(output_dir).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{output_dir}: output_dir cannot be created: {blocking} is a file; set output_dir to a folder")
    make_output_dir(path.parent)  # marked as finetune's only when created here: a user's folder is never removed
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            info = holder(path)
            if not info:  # the holder may be writing its details right now
                time.sleep(0.2)
                info = holder(path)
            raise LockedError(
                f"{Path(output_dir)}: {what} is already running into this folder ({describe(info)}); "
                f"{fix}. (A run that died leaves no lock: {path} is released when its process exits.)"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "launched": "LOCAL_RANK" in os.environ,
            "parent_pid": os.getppid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield info
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it could race with the next holder)
