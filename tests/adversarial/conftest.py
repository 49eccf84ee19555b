"""Fixtures of the adversarial suite: the shared small SFT run, and log handlers pointed at live streams."""

from __future__ import annotations

import logging
import sys

import pytest

from tests.conftest import ROOT, TINY_RECIPE, write_jsonl

from .cases import EXTRA_ROWS, QUICK


@pytest.fixture(autouse=True)
def _no_dead_log_handlers():
    """Log handlers made in an earlier test (a stage's logging.basicConfig, transformers' own handler) hold the
    sys.stderr of that test: pytest's capture, closed since; logging would print a "--- Logging error ---"
    traceback for every record. Point them at the current stderr."""
    loggers = [logging.root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    for logger in loggers:
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                h.stream = sys.stderr
    yield


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_base):
    """One small SFT run (2 steps, checkpoints 1 and 2 kept) with a malformed and an over-long extra row and
    the held-out set capped: (output_dir, the overrides it was run with, its metrics)."""
    from finetune import sft
    from finetune.recipe import load_recipe

    root = tmp_path_factory.mktemp("small_run")
    extra = write_jsonl(root / "extra.jsonl", EXTRA_ROWS)
    train = ROOT / "data/tiny/sft_train.jsonl"
    overrides = [
        *QUICK,
        f"sft.data.train=[{{path: {train}}}, {{path: {extra}}}]",
        "sft.data.skip_bad_rows=true",
        "sft.data.max_eval_rows=20",
    ]
    out = root / "run"
    metrics = sft.run(load_recipe(TINY_RECIPE, [f"output_dir={out}", *overrides]))
    return out, overrides, metrics
