"""Faults at the writes: read-only folders, a full disk, Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from tests.conftest import TINY_RECIPE

from .cases import (
    QUICK,
    Case,
    cases,
    cli,
    lock_holder,
    read_only,
    refused,
    small_disk,
    snapshot,
    start,
    unchanged,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= faults at the writes


@cases(
    Case(
        "read-only-output-dir",
        "faults",
        "output_dir on a read-only mount (chmod a-w without root)",
        "refused before the model loads: read-only, names the folder",
    ),
)
def test_a_read_only_output_dir_is_refused_before_loading(case, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    before = snapshot(out)
    with read_only(out):
        code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={out}")
    refused(code, err, "cannot write", str(out))
    assert "read-only file system" in err or "permission denied" in err
    unchanged(before, out)


@cases(
    Case(
        "disk-full-during-checkpoint",
        "faults",
        "output_dir on a 1 MiB tmpfs: the first checkpoint does not fit",
        "exit 2: 'no space left on the device', the folder and free space; the partial checkpoint never counts",
    ),
)
def test_a_full_disk_is_reported_as_a_full_disk(case, tmp_path, capsys, caplog):
    from finetune.core.resume import hf_checkpoint_problem

    with small_disk(tmp_path / "disk", "1m") as disk:
        (disk / "earlier.txt").write_text("an earlier result")
        before = snapshot(disk)
        code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={disk}", *QUICK)
        refused(code, err, f"no space left on the device of {disk}", "rerun the same command")
        assert snapshot(disk)["earlier.txt"] == before["earlier.txt"]  # what was there is kept
        partial = disk / "sft-checkpoints" / "checkpoint-1"
        assert not (disk / "sft").exists()
        assert not partial.exists() or hf_checkpoint_problem(partial) is not None  # never taken for complete


@cases(
    Case(
        "ctrl-c-during-training",
        "faults",
        "SIGINT to `finetune sft` while it trains",
        "exit 130, one line saying how to continue; no traceback; no output folder",
    ),
)
def test_ctrl_c_stops_a_stage_with_one_line(case, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "sft.log"
    proc = start(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "sft",
            str(TINY_RECIPE),
            f"output_dir={out}",
            *QUICK,
            "sft.max_steps=200",
        ],
        log,
    )
    try:
        assert wait_for(lambda: lock_holder(out / ".sft.lock").get("pid") == proc.pid, proc), log.read_text()[-3000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "finetune sft: interrupted (Ctrl-C)" in text
    assert not (out / "sft").exists()


@cases(
    Case(
        "ctrl-c-pipeline",
        "faults",
        "SIGINT to `finetune pipeline` (only) while its sft stage runs",
        "the stage gets SIGINT and stops; exit 130; pipeline_report.json written with sft `interrupted`",
    ),
)
def test_ctrl_c_stops_a_pipeline_and_writes_its_report(case, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "pipeline.log"
    proc = start(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "pipeline",
            str(TINY_RECIPE),
            f"output_dir={out}",
            "pipeline.stages=[sft]",
            *QUICK,
            "sft.max_steps=200",
        ],
        log,
    )
    try:

        def stage_running():
            holder = lock_holder(out / ".sft.lock")
            return bool(holder) and holder.get("pid") != proc.pid

        assert wait_for(stage_running, proc), log.read_text()[-3000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the pipeline only: it forwards to the stage
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text and "pipeline interrupted (Ctrl-C) during sft" in text
    report = json.loads((out / "pipeline_report.json").read_text())
    assert [(r["stage"], r["status"]) for r in report["stages"]] == [("sft", "interrupted")]
    assert report["complete"] is False
