"""Concurrent runs: one run per output, stale locks, launched ranks."""

from __future__ import annotations

import os

import pytest

from tests.conftest import TINY_RECIPE

from .cases import (
    Case,
    cases,
    cli,
    lock_held_by_another_process,
    lock_holder,
    refused,
    snapshot,
    unchanged,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= concurrent runs


@cases(
    Case(
        "second-run-same-output",
        "concurrency",
        "`finetune sft` into an output_dir whose sft lock a live process holds",
        "refused at once: names the other run's pid, host and command; nothing touched",
    ),
    Case(
        "second-pipeline-same-output",
        "concurrency",
        "`finetune pipeline` while another pipeline holds the lock",
        "refused at once, naming the other pipeline's process",
    ),
)
def test_a_second_run_into_the_same_output_is_refused(case, tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    name = "sft" if case.id == "second-run-same-output" else "pipeline"
    with lock_held_by_another_process(out, name) as other:
        before = snapshot(out)
        code, err = cli(capsys, name, TINY_RECIPE, f"output_dir={out}")
        refused(code, err, f"pid {other.pid} on host {socket.gethostname()}", "command:", "already running")
        unchanged(before, out)


@cases(
    Case(
        "stale-lock-of-a-killed-run",
        "concurrency",
        "the lock file of a run killed with SIGKILL",
        "does not block: the next run takes the lock",
    ),
)
def test_a_lock_left_by_a_killed_run_does_not_block(case, tmp_path):
    from finetune.core.locks import lock_path, output_lock

    out = tmp_path / "run"
    with lock_held_by_another_process(out, "sft") as other:
        pass  # killed with SIGKILL on leaving the block
    assert lock_holder(lock_path(out, "sft"))["pid"] == other.pid  # the file stays behind
    with output_lock(out, "sft", "the sft stage", "wait") as info:
        assert info["pid"] == os.getpid()


@cases(
    Case(
        "launched-ranks-share-the-lock",
        "concurrency",
        "non-zero ranks of one `accelerate launch` run",
        "only rank 0 takes the lock: the run's other processes are not refused",
    ),
)
def test_only_rank_zero_of_a_launched_run_takes_the_lock(case, tmp_path, monkeypatch):
    from finetune.core.locks import output_lock

    with output_lock(tmp_path, "sft", "the sft stage", "wait") as held:
        monkeypatch.setenv("RANK", "1")
        with output_lock(tmp_path, "sft", "the sft stage", "wait") as other_rank:
            assert held and other_rank is None
