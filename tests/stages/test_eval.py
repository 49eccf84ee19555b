"""`finetune eval`: lm-evaluation-harness on the tiny export and its base, offline, with the repository's own
task over the held-out SFT questions; its score is the export's held-out correctness."""

from __future__ import annotations

import json

import pytest

from finetune.recipe import RecipeError, load_recipe
from tests.conftest import TINY_RECIPE

pytest.importorskip("lm_eval", reason="lm-eval is part of the test extra")
pytestmark = pytest.mark.timeout(2400)  # the first test here may pay for the session's pipeline run


def read(folder, name="metrics.json"):
    return json.loads((folder / name).read_text())


def test_pipeline_eval_scores_the_export_as_its_held_out_correctness_and_the_base_beside_it(pipeline_run):
    out = pipeline_run["out"]
    evaluated, export, sft = read(out / "eval"), read(out / "export"), read(out / "sft")
    assert evaluated["model"] == str(out / "export")  # eval.model auto: the finished export
    assert evaluated["score_metric"] == "finetune_tiny_heldout exact_match"
    assert evaluated["score"] == pytest.approx(export["correct_rate_after"], abs=1e-9)
    assert evaluated["score_base"] == pytest.approx(sft["correct_rate_before"], abs=1e-9)  # the same base check
    assert evaluated["score"] > evaluated["score_base"]
    results = read(out / "eval", "results.json")
    assert results["model"]["n-shot"]["finetune_tiny_heldout"] == 0
    assert results["model"]["settings"]["finetune_tiny_heldout"]["apply_chat_template"] is True
    table = (out / "eval" / "results.md").read_text()
    assert "| finetune_tiny_heldout | exact_match | 0 | yes |" in table
    row = {r["stage"]: r for r in pipeline_run["report"]["stages"]}["eval"]
    assert (row["before"], row["after"]) == (evaluated["score_base"], evaluated["score"])
    log = pipeline_run["second"].stderr
    log = log[log.index("pipeline [6/6] eval: running") :]
    assert "lm-eval: ['finetune_tiny_heldout']" in log  # our lines, not lm-eval's bars and notices
    assert "it/s]" not in log and "already-initialized model" not in log and "Building contexts" not in log


def test_eval_of_an_export_folder_with_the_recipe_task(pipeline_run, tmp_path, capsys):
    from finetune import eval as evaluation

    export = pipeline_run["out"] / "export"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    code = evaluation.main([str(export), "--recipe", str(TINY_RECIPE), "--no-base", "--out", str(tmp_path / "ev")])
    assert code == 0
    got = read(tmp_path / "ev")
    assert got["score"] == pytest.approx(read(export)["correct_rate_after"], abs=1e-9)
    assert got["score_base"] is None and got["correct_rate_export"] == read(export)["correct_rate_after"]
    assert "finetune_tiny_heldout  exact_match" in capsys.readouterr().err  # the table
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before  # nothing written into the export


def test_eval_settings_are_checked_before_any_model_loads(tmp_path, capsys):
    from finetune import eval as evaluation

    with pytest.raises(RecipeError, match="eval.model: 'reward' is not a model this recipe makes"):
        load_recipe(TINY_RECIPE, ["eval.model=reward"])
    recipe = load_recipe(TINY_RECIPE, ["eval.tasks=[gsm8k, {name: mmlu, num_fewshot: 5, apply_chat_template: false}]"])
    assert [(t.name, t.num_fewshot, t.apply_chat_template) for t in recipe.eval.tasks] == [
        ("gsm8k", None, None),
        ("mmlu", 5, False),
    ]
    assert evaluation.main([str(tmp_path)]) == 2  # a folder without tasks or recipe
    assert "name the tasks (--tasks ifeval,gsm8k)" in capsys.readouterr().err
