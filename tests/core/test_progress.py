"""Progress and the one log style: timed lines when output is not a terminal (the heartbeat reaches a
phase stuck in one call), one-line step logs instead of the Trainer's dictionaries, --verbose."""

import logging
import subprocess
import sys

from finetune.core.progress import duration, step_line
from tests.conftest import ROOT, TINY_RECIPE, subprocess_env

SLOW_PHASES = """
import time
from finetune.core.progress import progress, track

for _ in track(range(6), "counting slowly", unit="items"):
    time.sleep(0.25)
with progress("one long call", announce=True):
    time.sleep(1.2)  # no update at all: only the heartbeat can report it
with progress("quick", total=3) as p:
    p.update(3)
"""


def run_piped(code: str, **env) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**subprocess_env(), "FINETUNE_PROGRESS": "auto", **env},
        capture_output=True,  # a pipe, not a terminal
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_output_to_a_pipe_gets_timed_lines_not_a_bar():
    err = run_piped(SLOW_PHASES, FINETUNE_PROGRESS_INTERVAL="0.3")
    lines = err.splitlines()
    counting = [x for x in lines if "counting slowly: " in x and "/6 items" in x]
    assert counting and any("left" in x for x in counting), err  # how far and about how long left
    assert any("counting slowly: done, 6 items in" in x for x in lines), err
    call = [x for x in lines if "one long call:" in x]
    assert "started" in call[0] and "done in" in call[-1], err
    assert any("elapsed" in x for x in call[1:-1]), err  # the heartbeat, while the call never updated
    assert not any("quick" in x for x in lines), err  # an instant phase stays quiet
    assert "\r" not in err and "it/s]" not in err  # no tqdm redraws in a log


def test_no_lines_within_the_interval():
    err = run_piped(SLOW_PHASES, FINETUNE_PROGRESS_INTERVAL="60")
    assert "counting slowly" not in err and "elapsed" not in err
    assert "one long call: started" in err and "one long call: done in" in err  # announced phases still say so


def test_step_lines_have_one_shape_for_every_stage():
    assert step_line("sft", 10, 40, {"loss": 1.23456, "lr": "4.90e-06", "token acc": 0.5, "x": None}) == (
        "sft     step 10/40  loss 1.235  lr 4.90e-06  token acc 0.5"
    )
    assert step_line("reward", 3, 8, {"loss": 1e-5}).startswith("reward  step 3/8  loss 1.00e-05")
    assert duration(5) == "5s" and duration(125) == "2m05s" and duration(7300) == "2h01m"


def test_trainer_logs_become_step_lines_and_verbose_adds_the_raw_dict(caplog, monkeypatch):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState

    from finetune.core.training import StepLog, use_step_log

    monkeypatch.setenv("FINETUNE_PROGRESS", "lines")
    caplog.set_level(logging.INFO, logger="finetune.progress")
    state = TrainerState(max_steps=40, global_step=10, is_world_process_zero=True)
    logs = {"loss": 0.3545, "grad_norm": 1.5, "learning_rate": 9.6e-4, "rewards/accuracies": 0.9, "epoch": 1.25}
    for verbose in (False, True):
        caplog.clear()
        cb = StepLog("dpo", verbose)
        cb.on_train_begin(None, state, None)
        cb.on_log(None, state, None, logs=dict(logs))
        cb.on_train_end(None, state, None)
        assert "dpo     step 10/40  loss 0.3545  lr 9.60e-04  reward acc 0.9" in caplog.text
        assert ("{'loss': 0.3545" in caplog.text) == verbose

    class FakeTrainer:  # the callback list as transformers.Trainer keeps it
        def __init__(self):
            self.callbacks = [PrinterCallback(), ProgressCallback()]

        def remove_callback(self, cls):
            self.callbacks = [c for c in self.callbacks if not isinstance(c, cls)]

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = FakeTrainer()
    use_step_log(trainer, "sft")
    use_step_log(trainer, "sft")
    assert [type(c) for c in trainer.callbacks] == [StepLog]


def test_verbose_flag_is_the_recipe_key():
    from finetune.launch import flags_to_overrides, recipe_from_argv

    assert recipe_from_argv([str(TINY_RECIPE), "--verbose"], "sft", "finetune sft").logging.verbose is True
    assert recipe_from_argv([str(TINY_RECIPE)], "sft", "finetune sft").logging.verbose is False
    assert flags_to_overrides(["r.yaml", "--verbose", "a=1"]) == ["r.yaml", "a=1", "logging.verbose=true"]


def test_pipeline_passes_a_quiet_stage_output_through_and_says_it_is_running(capsys, caplog, monkeypatch):
    from finetune.cli.pipeline import run_stage_process

    monkeypatch.setenv("FINETUNE_PROGRESS", "lines")
    monkeypatch.setenv("FINETUNE_PROGRESS_INTERVAL", "0.2")
    caplog.set_level(logging.INFO, logger="finetune.progress")
    child = "import sys, time; time.sleep(1.5); print('out'); print('err', file=sys.stderr); sys.exit(3)"
    assert run_stage_process([sys.executable, "-c", child], "pipeline [1/1] quiet") == 3
    captured = capsys.readouterr()
    assert captured.out == "out\n" and captured.err == "err\n"  # streams kept apart
    assert "pipeline [1/1] quiet: running, " in caplog.text
