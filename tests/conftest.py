"""Shared fixtures: the offline tiny model, its tokenizer, recipes in temp folders, one SFT run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = ROOT / "recipes" / "tiny_chat.yaml"


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny base shipped in the package (what builtin:tiny-phi loads)."""
    from finetune.tiny import base_path

    return base_path()


@pytest.fixture(scope="session")
def tiny_recipe():
    from finetune.recipe import load_recipe

    return load_recipe(TINY_RECIPE)


@pytest.fixture()
def tokenizer(tiny_base, tiny_recipe):
    from finetune.core.modeling import load_tokenizer

    return load_tokenizer(tiny_recipe)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_base):
    """One full SFT run of the offline default, shared by the tests that inspect its output."""
    from finetune import sft
    from finetune.recipe import load_recipe

    out = tmp_path_factory.mktemp("sft_run")
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={out}"])
    metrics = sft.run(recipe)
    return recipe, metrics, out / "sft"


def _chained_stage(stage: str, sft_run):
    import importlib

    from finetune.recipe import load_recipe

    _, _, sft_out = sft_run
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={sft_out.parent}"])
    metrics = importlib.import_module(f"finetune.{stage}").run(recipe)
    return recipe, metrics, recipe.stage_dir(stage)


@pytest.fixture(scope="session")
def reward_run(sft_run):
    """The reward stage of the offline default, chained from `sft_run` (same output_dir)."""
    return _chained_stage("reward", sft_run)


@pytest.fixture(scope="session")
def dpo_run(sft_run):
    """The DPO stage of the offline default, chained from `sft_run` (same output_dir)."""
    return _chained_stage("dpo", sft_run)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def subprocess_env() -> dict:
    """The environment for child processes: they import the `finetune` of this checkout (not whatever
    editable install the interpreter points at), so a test proves the code it sits beside."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


# The tiny recipe with shorter reward / DPO / PPO runs (SFT as shipped, so the export has learnt the task):
# the full recipe's figures are in the README; the tests check behaviour, and CI has 2 cores.
PIPELINE_QUICK = ["reward.num_train_epochs=1", "dpo.num_train_epochs=2", "ppo.updates=12", "ppo.save_every=4"]
# The session's pipeline reports to TensorBoard and to a local MLflow file store (tests/core/test_tracking.py reads
# them back with those libraries' own readers).
PIPELINE_TRACKERS = ["logging.report_to=[tensorboard,mlflow]"]


def tracking_env(folder: Path) -> dict:
    """subprocess_env() plus a local MLflow file store in `folder` (mlflow-skinny has no SQLite store)."""
    return {
        **subprocess_env(),
        "MLFLOW_TRACKING_URI": (folder / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }


def _wait_for(path: Path, proc, timeout: float) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.5)
    return path.exists()


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, tiny_base):
    """The whole pipeline on the offline default, killed (the pipeline and its stage process, SIGKILL)
    once PPO has saved its first checkpoint, then run again to the end. Shared by the pipeline, export,
    chat, eval and tracking tests: one full run for all of them (the CI machine has 2 cores)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("pipeline") / "run"
    cmd = [
        sys.executable,
        "-m",
        "finetune.cli",
        "pipeline",
        str(TINY_RECIPE),
        f"output_dir={out}",
        *PIPELINE_QUICK,
        *PIPELINE_TRACKERS,
    ]
    logs = out.parent
    env = {**tracking_env(logs), "FINETUNE_PROGRESS_INTERVAL": "2"}  # output to a file: timed progress lines
    started = time.time()
    with open(logs / "first.log", "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group: the kill reaches the stage too
        reached = _wait_for(out / "ppo-checkpoints" / "update-4" / "state.json", proc, timeout=1200)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_seconds = time.time() - started
    assert reached, "the pipeline never reached PPO's first checkpoint:\n" + (logs / "first.log").read_text()[-4000:]
    stages = ("sft", "reward", "dpo", "ppo", "export", "eval")
    finished_before_kill = {s: (out / s / "metrics.json").is_file() for s in stages}
    started = time.time()
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr[-4000:]
    return {
        "out": out,
        "cmd": cmd,
        "env": env,
        "mlflow_uri": env["MLFLOW_TRACKING_URI"],
        "finished_before_kill": finished_before_kill,
        "second": second,
        "first_log": (logs / "first.log").read_text(),
        "first_seconds": first_seconds,
        "second_seconds": time.time() - started,
        "report": json.loads((out / "pipeline_report.json").read_text()),
    }
