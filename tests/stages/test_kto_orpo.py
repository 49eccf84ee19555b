"""KTO (from the SFT output, unpaired rows) and ORPO (from the base, one stage) on the offline default: each
learns its own held-out figure, and the same run with learning switched off (a learning rate of 1e-12: 0 is
refused when the recipe loads) does not; the base stays bitwise equal; the output is a chat model export takes."""

import json
import shutil

import pytest

from finetune.core.data import DataError, DataReport, load_rows, to_unpaired
from finetune.recipe import DataSource, load_recipe
from tests.conftest import TINY_RECIPE, write_jsonl

SHORT = {
    "kto": ["kto.max_steps=8", "kto.eval_generate_rows=8", "samples.count=1"],
    "orpo": ["orpo.max_steps=12", "orpo.eval_generate_rows=8", "samples.count=1"],
}
OFF = "learning_rate=1e-12"  # learning switched off


def run_stage(stage: str, output_dir, *extra):
    import importlib

    module = importlib.import_module(f"finetune.{stage}")
    return module.run(load_recipe(TINY_RECIPE, [f"output_dir={output_dir}", *SHORT[stage], *extra]))


@pytest.fixture(scope="module")
def kto_runs(sft_run, tmp_path_factory):
    """KTO trained, and the control with learning switched off, each on a copy of the session's SFT output."""
    runs = {}
    for name, extra in (("trained", []), ("control", [f"kto.{OFF}"])):
        out = tmp_path_factory.mktemp(f"kto_{name}") / "run"
        shutil.copytree(sft_run[2], out / "sft")
        runs[name] = (out, run_stage("kto", out, *extra))
    return runs


def kto_learned(m: dict) -> bool:
    return m["eval_rewards_margin"] > 0.01 and m["eval_rewards_accuracy"] > 0.5


def test_kto_learns_desirable_from_undesirable_on_held_out_replies(kto_runs):
    _, m = kto_runs["trained"]
    assert m["eval_rewards_accuracy_before"] == 0.0 and m["eval_rewards_margin_before"] == 0.0  # policy == reference
    assert kto_learned(m), m
    assert m["base_unchanged"] and m["desirable_rows"] * 2 == m["train_rows"]  # each pair split in two


def test_kto_with_learning_switched_off_fails_the_same_check(kto_runs):
    _, m = kto_runs["control"]
    assert not kto_learned(m), m


def test_kto_reads_unpaired_rows_and_refuses_a_label_that_is_not_a_boolean(tmp_path, tiny_recipe):
    rows = [
        {"prompt": "What is 2 plus 3?", "completion": "5", "label": True},
        {"prompt": "What is 2 plus 3?", "completion": "7", "label": False},
        {"prompt": "What is 1 plus 1?", "completion": "2", "label": "yes"},
    ]
    data = DataSource(path=str(write_jsonl(tmp_path / "u.jsonl", rows)))
    with pytest.raises(DataError, match="row 3: label must be true or false"):
        load_rows([data], tiny_recipe, False, DataReport(), 0, to_unpaired)
    report = DataReport()
    good, _ = load_rows([data], tiny_recipe, True, report, 0, to_unpaired)
    assert sorted(r["label"] for r in good) == [False, True] and report.skipped_bad == 1


def test_a_kto_output_exports_with_parity(kto_runs):
    from finetune import export

    out, _ = kto_runs["trained"]
    metrics = export.run(load_recipe(TINY_RECIPE, [f"output_dir={out}", "export.stage=kto", "export.parity_prompts=2"]))
    assert [p.split("/")[-1] for p in metrics["adapters"]] == ["sft", "kto"]
    assert metrics["parity_max_abs_diff_fp32"] < 1e-4
    written = json.loads((out / "kto" / "metrics.json").read_text())
    assert {"eval_rewards_accuracy", "eval_rewards_margin", "correct_rate_start", "fingerprint"} <= set(written)


@pytest.fixture(scope="module")
def orpo_runs(tmp_path_factory):
    return {
        name: run_stage("orpo", tmp_path_factory.mktemp(f"orpo_{name}") / "run", *extra)
        for name, extra in (("trained", []), ("control", [f"orpo.{OFF}"]))
    }


def orpo_learned(m: dict) -> bool:
    """The held-out pairs it ranks right rose by 5 points (ORPO's margin is of log-odds, small on the tiny base)."""
    return m["eval_rewards_accuracy"] > m["eval_rewards_accuracy_before"] + 0.05


def test_orpo_trains_from_the_base_in_one_stage(orpo_runs):
    m = orpo_runs["trained"]
    assert m["start_from"] == []  # no SFT stage before it, no reference model beside it
    assert orpo_learned(m), m
    assert m["correct_rate_after"] > m["correct_rate_before"]  # it teaches the format too (NLL on the chosen reply)
    assert m["base_unchanged"]


def test_orpo_with_learning_switched_off_fails_the_same_check(orpo_runs):
    m = orpo_runs["control"]
    assert not orpo_learned(m) and not m["correct_rate_after"] > m["correct_rate_before"], m
