"""core.locks: one run per output. A second process holding the lock makes a run stop with a message naming the
holder and the fix; a lock whose holder died blocks nothing; only rank 0 of a launched run takes it."""

from __future__ import annotations

import json
import os
import signal

import pytest

from finetune.core.locks import LockedError, describe, held, lock_path, output_lock, target_lock
from finetune.core.ownership import OUTPUT, kind_of
from finetune.errors import UserError
from tests.adversarial.cases import lock_held_by_another_process


def test_a_lock_held_by_another_process_refuses_a_second_run_and_names_the_holder(tmp_path):
    with lock_held_by_another_process(tmp_path, "sft") as proc:
        info = held(tmp_path, "sft")
        assert info["pid"] == proc.pid and info["command"].endswith(f"{tmp_path} sft")
        with pytest.raises(LockedError) as e, output_lock(tmp_path, "sft", "the sft stage", "wait for it"):
            pytest.fail("the block ran while another process held the lock")
    message = str(e.value)
    assert f"{tmp_path}: the sft stage is already running into this folder" in message
    assert f"pid {proc.pid} on host" in message and "wait for it" in message
    assert str(lock_path(tmp_path, "sft")) in message  # where the lock is, and that a dead run leaves none
    assert isinstance(e.value, UserError)


def test_a_lock_whose_holder_was_killed_blocks_nothing(tmp_path):
    with lock_held_by_another_process(tmp_path, "sft") as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert lock_path(tmp_path, "sft").is_file()  # the file stays ...
        assert held(tmp_path, "sft") is None  # ... and nobody holds it
        with output_lock(tmp_path, "sft", "the sft stage", "wait") as info:
            assert info["pid"] == os.getpid()


def test_the_holder_writes_who_it_is_and_the_file_stays_after(tmp_path):
    out = tmp_path / "new" / "run"
    with output_lock(out, "pipeline", "the pipeline", "wait") as info:
        written = json.loads(lock_path(out, "pipeline").read_text())
        assert written == info
        assert {"pid", "host", "launched", "parent_pid", "started", "command"} <= set(info)
        assert held(out, "pipeline") == info  # what a reader is told while it runs
    assert lock_path(out, "pipeline").is_file() and held(out, "pipeline") is None


def test_locks_of_different_names_do_not_block_each_other(tmp_path):
    with lock_held_by_another_process(tmp_path, "sft"):
        assert held(tmp_path, "dpo") is None
        with output_lock(tmp_path, "dpo", "the dpo stage", "wait"):
            pass


def test_taking_the_lock_creates_and_marks_the_output_dir_only_when_it_is_new(tmp_path):
    with output_lock(tmp_path / "run", "sft", "the sft stage", "wait"):
        pass
    assert kind_of(tmp_path / "run") == OUTPUT
    mine = tmp_path / "mine"
    mine.mkdir()
    with output_lock(mine, "sft", "the sft stage", "wait"):
        pass
    assert kind_of(mine) is None  # a user's folder: written into, never marked as removable


def test_an_output_dir_under_a_file_fails_before_anything_is_written(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with (
        pytest.raises(UserError, match=r"output_dir cannot be created: .*taken is a file; set output_dir to a folder"),
        output_lock(tmp_path / "taken" / "run", "sft", "the sft stage", "wait"),
    ):
        pass


def test_only_rank_zero_of_a_launched_run_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with output_lock(tmp_path / "run", "sft", "the sft stage", "wait") as info:
        assert info is None
    assert not (tmp_path / "run").exists()


def test_every_write_target_has_its_lock_beside_it(tmp_path):
    assert target_lock(tmp_path / "run" / "sft") == (tmp_path / "run", "sft")
    assert target_lock(tmp_path / "exports" / "phi2-chat") == (tmp_path / "exports", "phi2-chat")
    assert lock_path(tmp_path, "sft") == tmp_path / ".sft.lock"


def test_describe_says_who_holds_it():
    info = {"pid": 12, "host": "node1", "started": "then", "command": "python x.py", "launched": True, "parent_pid": 3}
    assert describe(info) == "pid 12 on host node1, launched by pid 3, started then, command: python x.py"
    assert "has not written its details yet" in describe({})


def test_a_lock_file_nobody_holds_says_nothing_even_when_damaged(tmp_path):
    lock_path(tmp_path, "sft").write_text("not json")
    assert held(tmp_path, "sft") is None
    assert held(tmp_path / "absent", "sft") is None
