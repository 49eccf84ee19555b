"""The adversarial suite's case table and helpers: every case is a `Case` (group, trigger, expected
behaviour) registered by the `cases` decorator of the test that runs it; `python -m tests.adversarial`
prints the table docs/reliability.md carries (a test checks that it does).

Real faults where the machine allows: a tmpfs for a full disk and a read-only bind mount (as root; a
read-only folder falls back to chmod for other users, a full disk is skipped without root), real SIGINT
and SIGKILL on real processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

# ----------------------------------------------------------------------------- the case table


@dataclass(frozen=True)
class Case:
    id: str
    group: str
    trigger: str
    expected: str
    args: tuple = ()


REGISTRY: list[tuple[Case, str, str]] = []  # (case, test function, its module), in file order


def cases(*items: Case):
    """Parametrize a test over `items` and register them for the table."""

    def wrap(fn):
        REGISTRY.extend((c, fn.__name__, fn.__module__.rpartition(".")[2]) for c in items)
        return pytest.mark.parametrize("case", items, ids=[c.id for c in items])(fn)

    return wrap


def table() -> str:
    """The markdown table of every case (docs/reliability.md carries it)."""
    lines = ["| group | case | how it is triggered | expected behaviour | test |", "|---|---|---|---|---|"]
    for c, test, _ in REGISTRY:
        cells = [c.group, c.id, c.trigger, c.expected, f"`{test}[{c.id}]`"]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- helpers

QUICK = [  # a small SFT run: 2 steps, a checkpoint after each, the second run identical
    "sft.max_steps=2",
    "sft.save_steps=1",
    "sft.save_total_limit=2",
    "sft.eval_generate_rows=0",
    "sft.per_device_train_batch_size=4",
    "sft.max_length=96",
    "logging.logging_steps=1",
]


# a valid SFT row
GOOD = '{"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]}'


EXTRA_ROWS = [  # one malformed row and one over-long row, skipped and dropped (and named)
    {"messages": [{"role": "user", "content": "no reply here"}]},
    {"messages": [{"role": "user", "content": "What is 1 plus 1? " * 40}, {"role": "assistant", "content": "2"}]},
]


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run `finetune ARGV` in this process: (exit status, stderr). Nothing may escape as an exception."""
    from finetune.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def refused(code: int, err: str, *must: str) -> None:
    assert code == 2, f"exit {code}, expected 2:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for text in must:
        assert text in err, f"{text!r} not in:\n{err[-3000:]}"


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its sha256 (what 'nothing already produced changed' compares)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def unchanged(before: dict, folder: Path) -> None:
    """Every file of `before` is still there, byte for byte; new files may only be lock files."""
    after = snapshot(folder)
    changed = [k for k, v in before.items() if after.get(k) != v]
    added = [k for k in set(after) - set(before) if not Path(k).name.endswith(".lock")]
    assert not changed and not added, f"changed: {changed}, added: {added}"


def nothing_written(out: Path) -> None:
    """Nothing in `out` but what a run writes before it reads anything: its lock and the folder's mark."""
    left = [p.name for p in out.glob("*")] + [p.name for p in out.glob(".*")] if out.exists() else []
    assert not [n for n in left if not n.endswith(".lock") and n != ".finetune"], left


def copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*.lock"))
    return dest


def start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, **kw
    )


def wait_for(check, proc: subprocess.Popen | None, timeout: float = 300, every: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        if proc is not None and proc.poll() is not None:
            return check()
        time.sleep(every)
    return False


def lock_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/.finetune-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok.returncode == 0


MOUNT = can_mount()


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for the block: a read-only bind mount as root (root ignores permission bits),
    else chmod a-w."""
    if MOUNT:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
            yield
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)
    elif os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
    else:
        pytest.skip("root without mount: no way to make a folder read-only here")


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder`: a disk that really fills up."""
    if not MOUNT:
        pytest.skip("mounting a tmpfs (a real full disk) needs root")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


GROUP_MODULES = [  # the table's order: the suite's files, each in file order
    "test_recipes",
    "test_data",
    "test_silent",
    "test_resume",
    "test_faults",
    "test_concurrency",
    "test_outputs",
    "test_ownership",
    "test_freshness",
    "test_inference",
    "test_limits",
    "test_mistakes",
]


def all_cases_table() -> str:
    """The table of every case in the suite (importing each test module registers its cases)."""
    import importlib

    for name in GROUP_MODULES:
        importlib.import_module(f"tests.adversarial.{name}")
    order = {name: i for i, name in enumerate(GROUP_MODULES)}
    REGISTRY.sort(key=lambda entry: order.get(entry[2], len(order)))
    return table()


HOLD = """
import sys, time
from finetune.core.locks import output_lock
with output_lock(sys.argv[1], sys.argv[2], "a test", "wait"):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_by_another_process(output_dir: Path, name: str):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(output_dir), name], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()
