"""Faults at the writes: read-only folders, a full disk, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, TINY_RECIPE, subprocess_env

from .cases import (
    QUICK,
    Case,
    cases,
    cli,
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
        (signal.SIGINT,),
    ),
    Case(
        "sigterm-during-training",
        "faults",
        "SIGTERM (a scheduler, an Azure ML low-priority node) to `finetune sft` while it trains, checkpoints far apart",
        "a checkpoint at the next step, then exit 143 with one line; the rerun resumes from that step",
        (signal.SIGTERM,),
    ),
)
def test_a_signal_stops_a_stage_with_one_line(case, tmp_path):
    (sig,) = case.args
    out = tmp_path / "run"
    log = tmp_path / "sft.log"
    cmd = [sys.executable, "-m", "finetune.cli", "sft", str(TINY_RECIPE), f"output_dir={out}", *QUICK]
    proc = start([*cmd, "sft.max_steps=200", "sft.save_steps=1000"], log)
    try:
        assert wait_for(lambda: "sft training: started" in log.read_text(), proc), log.read_text()[-3000:]
        time.sleep(0.5)
        proc.send_signal(sig)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text and not (out / "sft").exists(), text[-3000:]
    if sig == signal.SIGINT:
        assert code == 130 and "finetune sft: interrupted (Ctrl-C)" in text, text[-3000:]
        return
    assert code == 143 and "finetune sft: terminated (SIGTERM; sft saved a checkpoint at step " in text, text[-3000:]
    saved = sorted((out / "sft-checkpoints").glob("checkpoint-*"))
    assert len(saved) == 1, saved  # save_steps is far: the SIGTERM's checkpoint
    step = int(saved[0].name.split("-")[1])
    again = subprocess.run(
        [*cmd, f"sft.max_steps={step + 1}", "sft.save_steps=1000"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming sft from {saved[0]}" in again.stderr
    assert json.loads((out / "sft" / "metrics.json").read_text())["global_steps"] == step + 1


@cases(
    Case(
        "ctrl-c-pipeline",
        "faults",
        "SIGINT to `finetune pipeline` (only) while its sft stage runs",
        "the stage gets SIGINT and stops; exit 130; pipeline_report.json written with sft `interrupted`",
        (signal.SIGINT,),
    ),
    Case(
        "sigterm-pipeline",
        "faults",
        "SIGTERM to `finetune pipeline` (only, as a scheduler sends it) while its sft stage trains",
        "passed on to the stage, which checkpoints and stops; exit 143; the report written, sft `terminated`",
        (signal.SIGTERM,),
    ),
)
def test_a_signal_stops_a_pipeline_and_writes_its_report(case, tmp_path):
    (sig,) = case.args
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
            "sft.save_steps=1000",
        ],
        log,
    )
    try:
        assert wait_for(lambda: "sft training: started" in log.read_text(), proc), log.read_text()[-3000:]
        time.sleep(0.5)
        proc.send_signal(sig)  # the pipeline only: it passes it on to the stage
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    how, code_expected, status = (
        ("interrupted (Ctrl-C)", 130, "interrupted")
        if sig == signal.SIGINT
        else ("terminated (SIGTERM)", 143, "terminated (SIGTERM)")
    )
    assert code == code_expected, text[-3000:]
    assert "Traceback" not in text and f"pipeline {how} during sft" in text
    report = json.loads((out / "pipeline_report.json").read_text())
    assert [(r["stage"], r["status"]) for r in report["stages"]] == [("sft", status)]
    assert report["complete"] is False
    if sig == signal.SIGTERM:  # the stage checkpointed before it stopped
        assert list((out / "sft-checkpoints").glob("checkpoint-*")), text[-3000:]


@cases(
    Case(
        "resumed-run-reports-the-same-loss",
        "faults",
        "sft run 4 steps straight, and 2 steps then resumed to 4",
        "the same train_loss (the mean over every step, not over the resumed steps only), the same steps",
    ),
)
def test_a_resumed_run_reports_what_an_unbroken_run_does(case, tmp_path):
    from finetune import sft
    from finetune.recipe import load_recipe

    quick = [*QUICK, "sft.save_steps=2", "sft.save_total_limit=3"]
    straight = sft.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}/a", *quick, "sft.max_steps=4"]))
    sft.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}/b", *quick, "sft.max_steps=2"]))
    resumed = sft.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}/b", *quick, "sft.max_steps=4"]))
    assert resumed["resumed_from"] is not None and resumed["global_steps"] == straight["global_steps"] == 4
    assert abs(resumed["train_loss"] - straight["train_loss"]) < 1e-6, (resumed["train_loss"], straight["train_loss"])
