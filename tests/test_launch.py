"""finetune.launch: the one command line a stage runs with (plain python or accelerate launch), and what every
stage's main() promises: run under the stage's lock, a user's mistake, a full disk or a second run is one
message and exit status 2, Ctrl-C is 130 and SIGTERM 143, never a traceback. The `run` given to stage_main here
is a stand-in for a stage's training: these tests are about what surrounds it."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune import launch
from finetune.core import stopping
from finetune.core.locks import held, target_lock
from finetune.core.ownership import MARK
from finetune.launch import (
    INTERRUPTED,
    flags_to_overrides,
    ignoring_sigint,
    ignoring_sigterm,
    launched,
    recipe_command,
    recipe_from_argv,
    run_child,
    run_stage,
    stage_command,
    stage_main,
    stage_script,
    stop_child,
)
from finetune.recipe import STAGES, RecipeError, load_recipe
from tests.conftest import ROOT, TINY_RECIPE, subprocess_env


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """stage_main installs a SIGTERM handler in this process: put pytest's back after each test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def main(stage, run, tmp_path, capsys, *extra):
    capsys.readouterr()
    code = stage_main(stage, run, [str(TINY_RECIPE), f"output_dir={tmp_path / 'run'}", *extra])
    return code, capsys.readouterr().err


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


# ----------------------------------------------------------------------------- the command line


def test_a_stage_runs_as_its_modules_file():
    for stage in STAGES:
        script = stage_script(stage.name)
        assert Path(script).is_file() and script.endswith(stage.module.replace(".", "/") + ".py")
    assert stage_script("sft", ROOT) == "finetune/sft.py"  # inside a job's code snapshot


def test_the_command_is_plain_python_or_accelerate_launch():
    assert stage_command("sft", "r.yaml", ["seed=1"], python="py", script="s.py") == ["py", "s.py", "r.yaml", "seed=1"]
    assert stage_command("sft", "r.yaml", ["seed=1"], "acc.yaml", 2, python="py", script="s.py") == [
        "py",
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "acc.yaml",
        "--num_processes",
        "2",
        "s.py",
        "r.yaml",
        "seed=1",
    ]


def test_a_recipes_accelerate_config_is_used_by_stages_that_may_use_a_launcher(tmp_path):
    config = tmp_path / "acc.yaml"
    config.write_text("num_processes: 2\n")
    recipe = load_recipe(TINY_RECIPE, [f"launch.accelerate_config={config}", "launch.num_processes=2"])
    for stage in STAGES:
        cmd = recipe_command(recipe, "r.yaml", stage.name, ["seed=1"])
        if stage.launcher:
            assert cmd[1:6] == ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes"]
        else:
            assert cmd == [sys.executable, stage_script(stage.name), "r.yaml", "seed=1"]


def test_verbose_becomes_the_recipe_key_and_wins():
    assert flags_to_overrides(["r.yaml", "--verbose", "logging.verbose=false"]) == [
        "r.yaml",
        "logging.verbose=false",
        "logging.verbose=true",
    ]
    assert flags_to_overrides(["r.yaml", "seed=1"]) == ["r.yaml", "seed=1"]


def test_launched_is_said_by_the_launchers_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_LAUNCH", raising=False)
    assert not launched()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched()


def test_print_config_prints_the_resolved_recipe_and_runs_nothing(capsys):
    assert recipe_from_argv([str(TINY_RECIPE), "seed=7", "--print-config"], "sft", "finetune sft") is None
    out = capsys.readouterr().out
    assert "seed: 7" in out and "output_dir:" in out


def test_a_recipe_without_the_stages_section_is_refused(tmp_path):
    recipe = tmp_path / "sft_only.yaml"
    data = ROOT / "data" / "tiny" / "sft_train.jsonl"
    raw = {
        "output_dir": str(tmp_path),
        "model": {"name_or_path": "builtin:tiny-phi"},
        "sft": {"data": {"train": [{"path": str(data)}]}},
    }
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as e:
        recipe_from_argv([str(recipe)], "dpo", "finetune dpo")
    assert str(e.value) == f"{recipe}: dpo: section missing; this recipe has no dpo stage"


# ----------------------------------------------------------------------------- what every stage's main() does


def test_a_stage_runs_under_its_lock_with_the_recipe_and_its_flags(tmp_path, capsys):
    seen = {}

    def run(recipe):
        seen["recipe"] = recipe
        seen["holder"] = held(*target_lock(recipe.stage_dir("sft")))

    code, err = main("sft", run, tmp_path, capsys, "seed=5", "--verbose")
    assert code == 0, err
    assert seen["recipe"].seed == 5 and seen["recipe"].logging.verbose
    assert seen["holder"]["pid"] == launch.os.getpid()
    assert held(*target_lock(seen["recipe"].stage_dir("sft"))) is None  # released at the end


def test_a_users_mistake_is_one_message_and_status_2(tmp_path, capsys):
    def run(recipe):
        raise RecipeError("recipe.yaml: sft.max_length: must be positive; set it to 512")

    code, err = main("sft", run, tmp_path, capsys)
    assert code == 2 and "finetune sft: error:\nrecipe.yaml: sft.max_length: must be positive; set it to 512" in err
    no_traceback(err)


def test_a_users_folder_where_the_stage_writes_stops_it_before_it_runs(tmp_path, capsys):
    users = tmp_path / "run" / "sft"
    users.mkdir(parents=True)
    (users / "thesis.tex").write_text("mine")
    ran = []
    code, err = main("sft", ran.append, tmp_path, capsys)
    assert code == 2 and not ran
    assert f"{users}: exists and was not made by finetune" in err and "Set output_dir" in err
    assert (users / "thesis.tex").read_text() == "mine" and not (users / MARK).exists()


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys):
    def run(recipe):
        raise KeyboardInterrupt

    code, err = main("sft", run, tmp_path, capsys)
    assert code == INTERRUPTED == 130
    assert "finetune sft: interrupted (Ctrl-C). Nothing half-written was kept" in err
    assert "Rerun the same command to continue from the last complete checkpoint" in err
    no_traceback(err)


def test_sigterm_is_one_line_and_status_143(tmp_path, capsys):
    def run(recipe):
        raise stopping.Terminated("a checkpoint was saved at step 3")

    code, err = main("sft", run, tmp_path, capsys)
    assert code == 143 and "finetune sft: terminated (SIGTERM; a checkpoint was saved at step 3)." in err
    no_traceback(err)


def test_a_full_disk_deep_in_a_library_is_one_message_naming_the_output_dir(tmp_path, capsys):
    def run(recipe):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    code, err = main("sft", run, tmp_path, capsys)
    assert code == 2 and f"finetune sft: error:\nno space left on the device of {tmp_path / 'run'}" in err
    no_traceback(err)


def test_a_bug_is_not_hidden(tmp_path, capsys):
    def run(recipe):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        main("sft", run, tmp_path, capsys)


def test_a_second_run_into_the_same_output_is_refused(tmp_path, capsys):
    from tests.adversarial.cases import lock_held_by_another_process

    (tmp_path / "run").mkdir()
    ran = []
    with lock_held_by_another_process(tmp_path / "run", "sft") as proc:
        code, err = main("sft", ran.append, tmp_path, capsys)
    assert code == 2 and not ran
    assert "the sft stage is already running into this folder" in err and f"pid {proc.pid}" in err


def test_run_stage_relaunches_under_the_recipes_accelerate_config(tmp_path, monkeypatch, capsys):
    config = tmp_path / "acc.yaml"
    config.write_text("num_processes: 2\n")
    ran = []
    monkeypatch.setattr(launch, "run_child", lambda cmd, env=None: ran.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_LAUNCH", raising=False)
    argv = [str(TINY_RECIPE), f"launch.accelerate_config={config}", "--verbose"]
    assert run_stage("sft", argv) == 0
    (cmd,) = ran
    assert cmd[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    assert cmd[-4:] == [
        stage_script("sft"),
        str(TINY_RECIPE),
        f"launch.accelerate_config={config}",
        "logging.verbose=true",
    ]
    assert "+ " + " ".join(cmd) in capsys.readouterr().err  # the command is shown, as a user would type it


# ----------------------------------------------------------------------------- a child stage process

CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(143)))
print("ready", flush=True)
try:
    time.sleep(30)
except KeyboardInterrupt:
    print("got SIGINT", flush=True)
    sys.exit(130)
"""


def child() -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=subprocess_env(), stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_run_child_returns_the_childs_exit_status():
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_after_sigterm_the_child_is_told_at_once():
    proc = child()
    started = time.time()
    stop_child(proc, terminated=True)
    assert proc.returncode == 143 and proc.stdout.read().strip() == "got SIGTERM"
    assert time.time() - started < 2  # passed on at once, not after the Ctrl-C grace


def test_after_ctrl_c_a_child_that_got_none_is_sent_sigint():
    proc = child()  # its own session: the terminal's Ctrl-C did not reach it
    stop_child(proc)
    assert proc.returncode == 130 and proc.stdout.read().strip() == "got SIGINT"


def test_ctrl_c_and_sigterm_are_ignored_while_a_child_stops_and_restored_after():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with ignoring_sigint(), ignoring_sigterm():
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
