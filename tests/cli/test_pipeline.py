"""`finetune pipeline` on the offline default: killed during PPO, rerun, finished stages skipped; the
table, pipeline_report.json and the curves; stage launch commands."""

import json
import re
import subprocess

import pytest

from finetune.recipe import RecipeError, load_recipe
from tests.conftest import ROOT, TINY_RECIPE

# The first test here pays for the session's one pipeline run (minutes on 2 busy cores).
pytestmark = pytest.mark.timeout(2400)


def test_killed_pipeline_continues_where_it_stopped(pipeline_run):
    before = pipeline_run["finished_before_kill"]
    assert before == {"sft": True, "reward": True, "dpo": True, "ppo": False, "export": False, "eval": False}
    report = pipeline_run["report"]
    assert [(r["stage"], r["status"]) for r in report["stages"]] == [
        ("sft", "skipped"),
        ("reward", "skipped"),
        ("dpo", "skipped"),
        ("ppo", "ran"),
        ("export", "ran"),
        ("eval", "ran"),
    ]
    assert report["complete"] is True
    stderr = pipeline_run["second"].stderr
    for stage in ("sft", "reward", "dpo"):
        assert f"{stage}: skipped (up to date" in stderr
    ppo = json.loads((pipeline_run["out"] / "ppo" / "metrics.json").read_text())
    assert ppo["resumed_from_update"] and ppo["resumed_from_update"] >= 4  # PPO went on from its checkpoint
    assert ppo["updates"] == 12
    print(
        f"\npipeline: first run {pipeline_run['first_seconds']:.0f}s (killed in ppo), "
        f"second run {pipeline_run['second_seconds']:.0f}s\n{pipeline_run['second'].stdout}"
    )


def test_report_table_and_curves(pipeline_run):
    out, report = pipeline_run["out"], pipeline_run["report"]
    stdout = pipeline_run["second"].stdout
    assert "== pipeline done" in stdout and "held-out correct" in stdout
    rows = {r["stage"]: r for r in report["stages"]}
    for stage in ("sft", "reward", "dpo", "ppo", "export", "eval"):
        assert f"\n{stage} " in stdout and rows[stage]["output"] == str(out / stage)
    assert rows["sft"]["after"] < rows["sft"]["before"]  # held-out loss fell
    assert rows["dpo"]["after"] > rows["dpo"]["before"]  # reward accuracy rose from 0 (policy == reference)
    assert rows["ppo"]["before"] is not None and rows["ppo"]["after"] is not None
    assert rows["export"]["after"] <= 1e-4  # fp32 logit parity
    base, exported = rows["sft"]["correct_before"], rows["export"]["correct_after"]
    assert exported > base  # the exported model answers held-out prompts better than the tiny base
    assert rows["export"]["correct_before"] == base
    assert all(rows[s]["seconds"] > 0 for s in rows)  # skipped stages keep the time of the run that made them
    assert rows["sft"]["seconds_from_earlier_run"] and not rows["ppo"]["seconds_from_earlier_run"]
    png = out / "pipeline_curves.png"
    assert report["curves"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("sft", "reward", "dpo"):  # the training curves the plot is drawn from
        history = json.loads((out / stage / "log_history.json").read_text())
        assert [h for h in history if "loss" in h]
    assert (out / "ppo" / "updates.jsonl").read_text().count("\n") == 12


def test_pipeline_log_to_a_file_has_progress_and_one_line_steps_not_trainer_dicts(pipeline_run):
    """Output to a file and a pipe (not a terminal): every training stage writes timed progress lines
    and one-line step logs of one shape, and none of the Trainer's dictionaries, tqdm redraws or
    library warnings nobody can act on. (The eval stage's lm-eval bars are lm-eval's own.)"""
    log = pipeline_run["first_log"] + pipeline_run["second"].stderr + pipeline_run["second"].stdout
    parts = re.split(r"^== pipeline \[\d+/\d+\] (\w+): ", log, flags=re.M)
    ours = "".join(text for stage, text in zip(parts[1::2], parts[2::2]) if stage != "eval")
    for stage in ("sft", "reward", "dpo", "ppo"):
        assert re.search(rf"^\S+ INFO finetune.progress: {stage} +step \d+/\d+  loss \S+  ", ours, re.M), stage
        assert f"{stage} training: started" in ours and f"{stage} training: done" in ours
    assert re.search(r"finetune.progress: \w+ training: \d+/\d+ (steps|updates) \(\d+%\), \S+ elapsed", ours)
    assert "loading builtin:tiny-phi (float32, sdpa): done in" in ours
    for noise in ("{'loss'", "'grad_norm'", "\r", "it/s]", "FutureWarning", "Setting accelerator", "LOAD REPORT"):
        assert noise not in ours, noise


def test_rerun_of_a_finished_pipeline_skips_everything(pipeline_run):
    res = subprocess.run(
        pipeline_run["cmd"], cwd=ROOT, env=pipeline_run["env"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count(": skipped (up to date") == 6 and "+ " not in res.stderr
    report = json.loads((pipeline_run["out"] / "pipeline_report.json").read_text())
    assert {r["status"] for r in report["stages"]} == {"skipped"}


def test_stage_commands_follow_the_recipe_launch_and_pass_overrides():
    from finetune.launch import recipe_command as stage_command

    recipe = load_recipe(ROOT / "recipes/phi2_chat.yaml")
    dpo = stage_command(recipe, "recipes/phi2_chat.yaml", "dpo", ["dpo.beta=0.2"])
    assert dpo[1:5] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/deepspeed_zero2.yaml"),
    ]
    assert dpo[-3:] == [str(ROOT / "finetune/dpo.py"), "recipes/phi2_chat.yaml", "dpo.beta=0.2"]
    export = stage_command(recipe, "recipes/phi2_chat.yaml", "export", ["dpo.beta=0.2"])
    assert "accelerate.commands.launch" not in export and export[1] == str(ROOT / "finetune/export.py")


def test_stage_subset_and_its_validation():
    recipe = load_recipe(TINY_RECIPE, ["pipeline.stages=[export, sft]"])
    assert recipe.pipeline_stages() == ["sft", "export"]  # always pipeline order
    assert load_recipe(TINY_RECIPE).pipeline_stages() == ["sft", "reward", "dpo", "ppo", "export", "eval"]
    every = load_recipe(TINY_RECIPE, ["pipeline.stages=null"]).pipeline_stages()  # every section: both RL stages
    assert every == ["sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "export", "eval"]
    with pytest.raises(RecipeError, match="pipeline.stages lists 'ppo', but the recipe has no ppo section"):
        load_recipe(TINY_RECIPE, ["pipeline.stages=[sft, ppo]", "ppo=null"])
    with pytest.raises(RecipeError, match=r"pipeline.stages: unknown stage 'sfx'; stages are sft, reward"):
        load_recipe(TINY_RECIPE, ["pipeline.stages=[sfx]"])


def test_missing_stage_library_stops_the_pipeline_before_anything_runs(tmp_path, monkeypatch, capsys):
    import importlib.util

    from finetune.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    out = tmp_path / "run"
    assert main(["pipeline", str(TINY_RECIPE), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "the eval stage needs lm_eval, which is not installed: pip install 'finetune[eval]'" in err
    assert "pipeline.stages=[sft, reward, dpo, ppo, export]. Nothing was run." in err and "Traceback" not in err
    assert not (out / "sft").exists() and not (out / "pipeline_report.json").exists()
