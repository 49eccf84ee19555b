"""Failures of the machine rather than of the code: a full disk, a read-only or forbidden folder.

They reach a stage from deep inside a library, and not always as an OSError: torch.save reports a full
disk as `RuntimeError: PytorchStreamWriter failed writing file ...: file write failed`, safetensors as
`SafetensorError: ... StorageFull ... (os error 28)`. `describe` recognises them (the errno anywhere in
the exception chain, or those texts) and says in one line what happened and where, so a command can
print that instead of a traceback.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

DISK_FULL_TEXTS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")
WRITE_FAILED_TEXTS = ("file write failed", "failed writing file", "unexpected pos")
# With only a write-failure text to go on, call it a full disk only when the disk really is (nearly) full.
NEARLY_FULL_BYTES = 16 * 2**20


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(exc: BaseException, where: str | Path) -> str | None:
    """One line naming what went wrong (disk full, read-only, permission) and the folder, or None when
    `exc` is none of these. `where` is the folder the command writes to (output_dir)."""
    where = Path(where)
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _disk_full(where, e.filename)
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return f"cannot write {e.filename or where}: it is on a read-only file system; use a writable output_dir"
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM) and e.filename:
            return f"cannot write {e.filename}: permission denied; use an output_dir you may write to"
        text = str(e).lower()
        if any(t in text for t in DISK_FULL_TEXTS):
            return _disk_full(where, None)
        if any(t in text for t in WRITE_FAILED_TEXTS):
            free = _free_bytes(where)
            if free is not None and free < NEARLY_FULL_BYTES:
                return _disk_full(where, None)
    return None


def _disk_full(where: Path, filename) -> str:
    free = _free_bytes(where)
    left = f" ({_human(free)} free)" if free is not None else ""
    file = f" writing {filename}" if filename else ""
    return (
        f"no space left on the device of {where}{file}{left}. Free some space or set output_dir to a disk with room, "
        "then rerun the same command: what was complete is kept (outputs and checkpoints count only once fully "
        "written) and the run resumes from its last complete checkpoint"
    )
