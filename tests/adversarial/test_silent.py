"""Nothing silent: every row not used is named; runs that would do nothing are refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.conftest import TINY_RECIPE, write_jsonl

from .cases import (
    EXTRA_ROWS,
    GOOD,
    Case,
    cases,
    cli,
    refused,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= nothing silent


@cases(
    Case(
        "dropped-rows-named",
        "silent",
        "a malformed row (skip_bad_rows) and a row over max_length",
        "counted, named in the log and in `<stage>/dropped_rows.jsonl` (source, row, reason)",
    ),
    Case(
        "max-eval-rows-cut",
        "silent",
        "`data.max_eval_rows=20` with 31 held-out rows",
        "says 11 left out; metrics `eval_rows_left_out`; rows named in dropped_rows.jsonl",
    ),
)
def test_every_row_not_used_is_named(case, small_run):
    out, _, metrics = small_run
    dropped = [json.loads(x) for x in (out / "sft" / "dropped_rows.jsonl").read_text().splitlines()]
    if case.id == "dropped-rows-named":
        assert metrics["skipped_bad_rows"] == 1 and metrics["dropped_overlong_rows"] == 1
        bad = [d for d in dropped if d["kind"] in ("malformed", "overlong")]
        assert [(Path(d["source"]).name, d["row"], d["kind"]) for d in bad] == [
            ("extra.jsonl", 1, "malformed"),
            ("extra.jsonl", 2, "overlong"),
        ]
        assert "no assistant message" in bad[0]["reason"] and "> max_length 96" in bad[1]["reason"]
    else:
        assert metrics["eval_rows"] == 20 and metrics["eval_rows_left_out"] == 11
        cut = [d for d in dropped if d["kind"] == "max_eval_rows"]
        assert len(cut) == 11 and all(d["split"] == "eval" and isinstance(d["row"], int) for d in cut)


@cases(
    Case(
        "drops-in-the-log",
        "silent",
        "rows skipped and dropped while loading",
        "the log names the first rows and where the full list is",
    ),
)
def test_drops_are_named_in_the_log(case, tmp_path, caplog, tokenizer):
    from finetune.chat_template import load_template
    from finetune.core.data import DataReport, tokenize_conversations, train_eval_rows
    from finetune.recipe import validate_recipe

    rows = [json.loads(GOOD)] * 6 + EXTRA_ROWS
    write_jsonl(tmp_path / "d.jsonl", rows)
    r = validate_recipe(
        {
            "output_dir": "o",
            "model": {"name_or_path": "builtin:tiny-phi"},
            "sft": {"data": {"train": [{"path": "d.jsonl"}], "eval": [{"path": "d.jsonl"}], "skip_bad_rows": True}},
        },
        source=str(tmp_path / "r.yaml"),
    )
    caplog.set_level(logging.INFO)
    train, _, report, _ = train_eval_rows(r.sft.data, r, seed=0)
    tokenize_conversations(train, tokenizer, load_template("phi_instruct"), 64, "drop", report, "train")
    assert f"{tmp_path / 'd.jsonl'}: 1 rows skipped: row 7 (no assistant message" in caplog.text
    assert f"{tmp_path / 'd.jsonl'} row 8 (" in caplog.text and "dropped_rows.jsonl" in caplog.text
    assert [d["row"] for d in report.drops] == [7, 8] and isinstance(report, DataReport)


# ============================================================================= silent no-ops


@cases(
    Case(
        "ppo-rollout-larger-than-prompts",
        "recipe",
        "`ppo.rollout_batch_size` above the distinct prompts",
        "refused before the model loads: says each update would repeat prompts",
    ),
)
def test_ppo_rollout_larger_than_the_prompts_is_refused(case, small_run, tmp_path, capsys):
    out, _, _ = small_run
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"What is {i} plus 1?"} for i in range(5)])
    code, err = cli(
        capsys,
        "ppo",
        TINY_RECIPE,
        f"output_dir={tmp_path / 'ppo-run'}",
        f"ppo.start_from={out / 'sft'}",
        "ppo.reward_from=none",
        "ppo.reward_function=finetune.rl.rewards:exact_answer",
        f"ppo.data.train=[{{path: {prompts}}}]",
        f"ppo.data.eval=[{{path: {prompts}}}]",
        "ppo.rollout_batch_size=8",
    )
    refused(code, err, "ppo.rollout_batch_size: 8 prompts per update", "more than the 5 distinct training prompts")
    assert not (tmp_path / "ppo-run" / "ppo").exists()
