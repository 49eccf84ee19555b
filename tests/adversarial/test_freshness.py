"""A result always matches what it claims to be made from: the pipeline reruns a stage whose settings, data,
base, template or inputs changed (and says what changed); adapter chains are recorded relative to the output
with their content, so a moved run keeps working and a changed adapter is refused; every write target is
locked and nothing reads an output another process is writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.recipe import STAGES, load_recipe
from tests.conftest import PIPELINE_QUICK, ROOT, TINY_RECIPE

from .cases import Case, cases, cli, lock_held_by_another_process, refused, snapshot, unchanged

pytestmark = pytest.mark.timeout(1200)

# A setting of each stage that changes what it makes (the TRL stages: their learning rate).
OWN_SETTING = {"ppo": "ppo.kl_coef=0.1", "export": "export.parity_prompts=3", "eval": "eval.apply_chat_template=false"}


def setting_of(stage: str) -> str:
    return f"{stage}.learning_rate=1.234e-3" if STAGES[stage].trl_config else OWN_SETTING[stage]


def ran_stages(pipeline_run) -> list[str]:
    return [r["stage"] for r in pipeline_run["report"]["stages"]]


@pytest.fixture
def run_copy(pipeline_run, tmp_path):
    """A copy of the session's finished pipeline output (moved as a whole: its lineage is relative)."""
    dest = tmp_path / "run"
    shutil.copytree(pipeline_run["out"], dest, ignore=shutil.ignore_patterns("*.lock"))
    return dest


def test_every_stage_is_out_of_date_when_its_own_setting_changes(pipeline_run, run_copy):
    """For every stage of the pipeline: with one of its settings changed, it is out of date (the reason names the
    key and both values) while every stage before it stays up to date."""
    from finetune.cli.pipeline import freshness

    stages = ran_stages(pipeline_run)
    base = [f"output_dir={run_copy}", *PIPELINE_QUICK]
    for stage in stages:
        assert freshness(load_recipe(TINY_RECIPE, base), stage)[0], stage  # the copy is up to date as it is
    for i, stage in enumerate(stages):
        change = setting_of(stage)
        recipe = load_recipe(TINY_RECIPE, [*base, change])
        fresh, why = freshness(recipe, stage)
        key, value = change.split("=")
        assert not fresh and key in why and "->" in why, (stage, why)
        assert all(freshness(recipe, earlier)[0] for earlier in stages[:i]), stage


@cases(
    Case(
        "data-content-changed",
        "freshness",
        "one row of sft's training file changed (same path), then `finetune pipeline`",
        "sft is out of date: 'the data of sft.data.train changed'",
    ),
    Case(
        "data-moved-unchanged",
        "freshness",
        "sft's training file copied elsewhere, the recipe pointed at the copy",
        "up to date: the same content is the same data",
    ),
    Case(
        "template-changed",
        "freshness",
        "`template.name` pointed at a .jinja with one more character",
        "every stage is out of date: 'the chat template changed'",
    ),
    Case(
        "base-weights-changed",
        "freshness",
        "a local base folder whose weights changed at the same path",
        "out of date ('the base model changed'), and a resume is refused naming the base's content",
    ),
)
def test_data_template_and_base_content_count(case, pipeline_run, run_copy, tmp_path):
    from finetune.cli.pipeline import freshness
    from finetune.core.resume import differences, run_identity

    base = [f"output_dir={run_copy}", *PIPELINE_QUICK]
    if case.id.startswith("data-"):
        data = tmp_path / "sft_train.jsonl"
        rows = (ROOT / "data" / "tiny" / "sft_train.jsonl").read_text().splitlines()
        if case.id == "data-content-changed":
            rows[3] = rows[3].replace('"content": "', '"content": "Please: ', 1)
        data.write_text("\n".join(rows) + "\n")
        recipe = load_recipe(TINY_RECIPE, [*base, f"sft.data.train=[{{path: {data}}}]"])
        fresh, why = freshness(recipe, "sft")
        if case.id == "data-moved-unchanged":
            assert fresh, why
        else:
            assert not fresh and "the data of sft.data.train changed" in why, why
        return
    if case.id == "template-changed":
        template = tmp_path / "mine.jinja"
        template.write_text((ROOT / "finetune" / "templates" / "phi_instruct.jinja").read_text() + " ")
        recipe = load_recipe(TINY_RECIPE, [*base, f"template.name={template}"])
        for stage in ran_stages(pipeline_run):
            fresh, why = freshness(recipe, stage)
            assert not fresh and "the chat template changed" in why, (stage, why)
        return
    from finetune.tiny import base_path

    local = tmp_path / "base"
    shutil.copytree(base_path(), local)
    recipe = load_recipe(TINY_RECIPE, [*base, f"model.name_or_path={local}"])
    before = run_identity(recipe, "sft", [])
    weights = local / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    from finetune.core import fingerprints

    fingerprints._hashes.clear()  # a new process would see the new size/time; this one remembers by them
    after = run_identity(recipe, "sft", [])
    assert any(d.startswith("model.sha256") for d in differences("sft", before, after)), differences(
        "sft", before, after
    )


def test_a_changed_setting_reruns_that_stage_and_the_later_ones_and_says_why(pipeline_run, run_copy):
    """A real rerun: export's setting changed, so export runs again and so does eval (its input was made
    again); every earlier stage is skipped as up to date. The report says why each ran or was skipped."""
    import subprocess
    import sys

    stages = ran_stages(pipeline_run)
    cmd = [
        sys.executable,
        "-m",
        "finetune.cli",
        "pipeline",
        str(TINY_RECIPE),
        f"output_dir={run_copy}",
        *PIPELINE_QUICK,
    ]
    done = subprocess.run([*cmd, "export.parity_prompts=3"], cwd=ROOT, env=pipeline_run["env"], capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_copy / "pipeline_report.json").read_text())
    status = {r["stage"]: (r["status"], r.get("why", "")) for r in report["stages"]}
    later = stages[stages.index("export") :]
    for stage in stages:
        if stage in later:
            assert status[stage][0] == "ran", status
        else:
            assert status[stage][0] == "skipped" and status[stage][1].startswith("up to date"), status
    assert "export.parity_prompts: 4 -> 3" in status["export"][1], status
    assert "was made again" in status[later[-1]][1] or later == ["export"], status
    assert (
        "skipped (up to date" in done.stderr and "running (changed since it ran: export.parity_prompts" in done.stderr
    )


@cases(
    Case(
        "moved-run-folder",
        "lineage",
        "the whole output_dir moved elsewhere, `finetune export` run from another working directory",
        "the chain is found inside the moved folder (recorded relative to each output) and checked; export works",
    ),
    Case(
        "adapter-replaced-under-a-later-stage",
        "lineage",
        "the sft adapter replaced by another adapter after dpo and ppo were trained on it, then `finetune export`",
        "refused before merging: names the adapter and that it changed since (its sha256); nothing written",
    ),
)
def test_lineage_follows_the_run_and_checks_content(case, pipeline_run, run_copy, tmp_path, capsys, monkeypatch):
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run_copy, moved)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths the run recorded would now point nowhere
    target = tmp_path / "exported"
    args = [TINY_RECIPE, f"output_dir={moved}", f"export.output={target}", "export.parity_prompts=1"]
    if case.id == "adapter-replaced-under-a-later-stage":
        shutil.copy(moved / "dpo" / "adapter_model.safetensors", moved / "sft" / "adapter_model.safetensors")
        before = snapshot(moved)
        code, err = cli(capsys, "export", *args)
        refused(code, err, f"{moved / 'sft'}", "has changed since")
        unchanged(before, moved)
        assert not target.exists()
        return
    code, err = cli(capsys, "export", *args)
    assert code == 0, err[-3000:]
    metrics = json.loads((target / "metrics.json").read_text())
    assert all(Path(a).is_relative_to(moved) for a in metrics["adapters"]), metrics["adapters"]
    assert metrics["parity_max_abs_diff_fp32"] < 1e-4


@cases(
    Case(
        "export-while-ppo-runs",
        "concurrency",
        "`finetune export` while another process holds the ppo stage's lock (PPO still training)",
        "refused at once: names the ppo stage and the process writing it (not the older dpo model exported)",
    ),
    Case(
        "two-exports-one-target",
        "concurrency",
        "`finetune export` into an export.output outside the output_dir that another export is writing",
        "refused at once: the target's own lock, beside it, names the other run",
    ),
)
def test_every_write_target_is_locked_and_inputs_being_written_are_not_read(case, small_run, tmp_path, capsys):
    from finetune.core.locks import target_lock

    run = tmp_path / "run"
    shutil.copytree(small_run[0], run, ignore=shutil.ignore_patterns("*.lock"))
    if case.id == "export-while-ppo-runs":
        with lock_held_by_another_process(*target_lock(run / "ppo")):
            code, err = cli(capsys, "export", TINY_RECIPE, f"output_dir={run}")
        refused(code, err, "the ppo stage is being written into", "wait for it to finish")
        assert not (run / "export").exists()
        return
    target = tmp_path / "shared" / "exported"
    with lock_held_by_another_process(*target_lock(target)):
        code, err = cli(capsys, "export", TINY_RECIPE, f"output_dir={run}", f"export.output={target}")
    refused(code, err, "the export stage is already running into", str(target.parent))
    assert not target.exists()
