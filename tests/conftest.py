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
    from finetune.tiny import ensure_tiny_phi

    return ensure_tiny_phi()


@pytest.fixture(scope="session")
def tiny_recipe():
    from finetune.recipe import load_recipe

    return load_recipe(TINY_RECIPE)


@pytest.fixture()
def tokenizer(tiny_base, tiny_recipe):
    from finetune.modeling import load_tokenizer

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
    env.setdefault("FINETUNE_CACHE", str(Path.home() / ".cache" / "finetune"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env
