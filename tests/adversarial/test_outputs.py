"""Earlier outputs: damaged ones are named; export replaces an earlier export (what it must never replace is in
test_ownership.py, with every other command's targets)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_RECIPE

from .cases import (
    Case,
    cases,
    cli,
    copy_run,
    read_only,
    refused,
    snapshot,
    unchanged,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= corrupt earlier outputs

CORRUPT_CASES = [
    Case(
        "earlier-metrics-damaged",
        "corrupt-output",
        "the sft output's metrics.json cut short, then `finetune dpo`",
        "refused: names the file, says to rerun the stage",
    ),
    Case(
        "earlier-adapter-truncated",
        "corrupt-output",
        "the sft adapter_model.safetensors truncated, then `finetune dpo`",
        "refused before loading: names the file and the truncation",
    ),
    Case(
        "earlier-adapter-config-damaged",
        "corrupt-output",
        "the sft adapter_config.json not JSON, then `finetune dpo`",
        "refused: names the file",
    ),
    Case(
        "earlier-metrics-damaged-pipeline",
        "corrupt-output",
        "a finished stage's metrics.json damaged, then `finetune pipeline`",
        "refused with the file named (the report reads it)",
    ),
]


@cases(*CORRUPT_CASES)
def test_a_damaged_earlier_output_is_named(case, small_run, tmp_path, capsys):
    run = copy_run(small_run[0], tmp_path)
    sft_out = run / "sft"
    if case.id in ("earlier-metrics-damaged", "earlier-metrics-damaged-pipeline"):
        damaged = sft_out / "metrics.json"
        damaged.write_text(damaged.read_text()[:40])
        must = [f"{damaged}: damaged (not valid JSON", "run the stage that made it again"]
    elif case.id == "earlier-adapter-truncated":
        damaged = sft_out / "adapter_model.safetensors"
        with damaged.open("r+b") as fh:
            fh.truncate(5000)
        must = [f"{damaged}: damaged (", "truncated"]
    else:
        damaged = sft_out / "adapter_config.json"
        damaged.write_text("{ not json")
        must = [f"{damaged}: damaged (not valid JSON"]
    before = snapshot(run)
    if case.id == "earlier-metrics-damaged-pipeline":
        code, err = cli(capsys, "pipeline", TINY_RECIPE, f"output_dir={run}", "pipeline.stages=[sft]", *small_run[1])
    else:
        code, err = cli(capsys, "dpo", TINY_RECIPE, f"output_dir={run}")
    refused(code, err, *must)
    unchanged({k: v for k, v in before.items() if k != "pipeline_report.json"}, run)


# ============================================================================= export must not destroy


@cases(
    Case(
        "export-force-over-earlier-export",
        "data-loss",
        "`--force` onto a folder holding an earlier export",
        "accepted (the one thing --force replaces)",
    ),
    Case(
        "export-read-only-parent",
        "faults",
        "`export.output` under a read-only folder",
        "refused before merging: read-only, names the folder",
    ),
)
def test_export_target_checks_let_an_earlier_export_be_replaced(case, tmp_path, capsys):
    from finetune.export import check_export_target
    from finetune.recipe import load_recipe

    if case.id == "export-force-over-earlier-export":
        target = tmp_path / "export"
        target.mkdir()
        (target / "config.json").write_text("{}")
        (target / "recipe.yaml").write_text("output_dir: run\n")  # an export of an earlier finetune (no mark)
        (target / "metrics.json").write_text(json.dumps({"stage": "sft", "adapters": ["x"]}))
        recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path / 'run'}", f"export.output={target}"])
        check_export_target(recipe, target, force=True)  # no error
        return
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        code, err = cli(
            capsys, "export", TINY_RECIPE, f"output_dir={tmp_path / 'run'}", f"export.output={parent / 'export'}"
        )
    refused(code, err, "cannot write", str(parent))
