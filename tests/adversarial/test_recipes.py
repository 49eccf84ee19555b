"""Bad recipes: values, overrides, model paths, templates, recipe files and output folders."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_RECIPE

from .cases import (
    Case,
    cases,
    cli,
    refused,
    snapshot,
    unchanged,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= bad recipes

RECIPE_CASES = [
    Case(
        "negative-learning-rate",
        "recipe",
        "`training.learning_rate=-1e-4`",
        "refused at load: key, range",
        ("training.learning_rate=-1e-4",),
    ),
    Case(
        "negative-batch-size",
        "recipe",
        "`sft.per_device_train_batch_size=-2`",
        "refused at load: key, range",
        ("sft.per_device_train_batch_size=-2",),
    ),
    Case(
        "zero-max-steps",
        "recipe",
        "`sft.max_steps=0` (a run that trains nothing)",
        "refused: trains nothing",
        ("sft.max_steps=0",),
    ),
    Case("zero-epochs", "recipe", "`sft.num_train_epochs=0`", "refused: trains nothing", ("sft.num_train_epochs=0",)),
    Case(
        "nan-learning-rate",
        "recipe",
        "`training.learning_rate=.nan`",
        "refused at load",
        ("training.learning_rate=.nan",),
    ),
    Case("negative-warmup", "recipe", "`sft.warmup_steps=-5`", "refused at load", ("sft.warmup_steps=-5",)),
    Case(
        "save-total-limit-zero",
        "recipe",
        "`sft.save_total_limit=0` (keeps no checkpoint)",
        "refused at load",
        ("sft.save_total_limit=0",),
    ),
    Case(
        "override-bad-yaml",
        "recipe",
        "`sft.max_steps=[1` (unclosed list)",
        "refused: not valid YAML, how to quote",
        ("sft.max_steps=[1",),
    ),
    Case(
        "override-list-index",
        "recipe",
        "`sft.data.train.3.path=x.jsonl` (past the list)",
        "refused: names the list and its valid indices",
        ("sft.data.train.3.path=x.jsonl",),
    ),
    Case("override-into-scalar", "recipe", "`seed.value=1`", "refused: seed is not a section", ("seed.value=1",)),
    Case(
        "override-without-value",
        "recipe",
        "`sft.max_steps` (no `=`)",
        "refused: expected KEY=VALUE",
        ("sft.max_steps",),
    ),
    Case("misspelt-key", "recipe", "`sft.max_step=3`", "refused: nearest valid key", ("sft.max_step=3",)),
    Case("wrong-type", "recipe", "`sft.max_steps=many`", "refused: expected int", ("sft.max_steps=many",)),
    Case(
        "resume-path-missing",
        "recipe",
        "`sft.resume=/nonexistent/checkpoint-3`",
        "refused: folder not found",
        ("sft.resume=/nonexistent/checkpoint-3",),
    ),
]
RECIPE_MESSAGES = {
    "negative-learning-rate": ["training.learning_rate: must be a number > 0, got -0.0001"],
    "negative-batch-size": ["sft.per_device_train_batch_size: must be an integer >= 1, got -2"],
    "zero-max-steps": ["sft.max_steps: must be -1", "0 steps trains nothing"],
    "zero-epochs": ["sft.num_train_epochs: must be a number > 0", "0 epochs trains nothing"],
    "nan-learning-rate": ["training.learning_rate: must be a number > 0, got nan"],
    "negative-warmup": ["sft.warmup_steps: must be a number >= 0, got -5"],
    "save-total-limit-zero": ["sft.save_total_limit: must be an integer >= 1"],
    "override-bad-yaml": ["override 'sft.max_steps=[1': the value is not valid YAML", "quote it"],
    "override-list-index": ["sft.data.train is a list of 1; index it with a number from 0 to 0"],
    "override-into-scalar": ["override seed.value: seed is not a section"],
    "override-without-value": ["override 'sft.max_steps': expected KEY=VALUE"],
    "misspelt-key": ["sft.max_step: unknown key", "did you mean 'max_steps'?"],
    "wrong-type": ["sft.max_steps: expected int, got str 'many'"],
    "resume-path-missing": ["sft.resume: checkpoint folder not found: /nonexistent/checkpoint-3"],
}


@cases(*RECIPE_CASES)
def test_bad_recipe_values_are_refused_before_anything_loads(case, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("an earlier result")
    before = snapshot(tmp_path / "out")
    code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={tmp_path / 'out'}", *case.args)
    refused(code, err, *RECIPE_MESSAGES[case.id])
    unchanged(before, tmp_path / "out")


@cases(
    Case(
        "missing-local-model",
        "recipe",
        "`model.name_or_path=./models/missing` (a path that does not exist)",
        "refused: no such folder, names the key (not hub repo-id syntax)",
    ),
)
def test_a_missing_local_model_folder_is_named_as_a_path(case, tmp_path, capsys):
    code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={tmp_path}", "model.name_or_path=./models/missing")
    refused(code, err, "model.name_or_path: ./models/missing: no such folder", "a path, not a hub id")
    assert "Repo id must" not in err


@cases(
    Case(
        "hub-id-offline",
        "recipe",
        "a hub id not in the cache, with the hub unreachable",
        "refused at once: says offline and how to get the model",
    ),
)
def test_a_hub_model_without_network_says_offline_at_once(case, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    from finetune.core import hub

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    hub._probe.cache_clear()
    try:
        code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={tmp_path}", "model.name_or_path=acme/not-cached-7b")
    finally:
        hub._probe.cache_clear()
    refused(code, err, "model.name_or_path: acme/not-cached-7b is a hub id and the hub is offline", "local cache")


@cases(
    Case(
        "template-syntax-error",
        "recipe",
        "a `.jinja` template with an unclosed `{% for %}`",
        "refused: names the template file and line",
    ),
    Case("template-missing", "recipe", "`template.name=missing.jinja`", "refused: not found, lists the shipped ones"),
)
def test_bad_templates_name_the_file(case, tmp_path, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}\n{{ m['content'] }}\n{% endfo %}\n")
    name = str(bad) if case.id == "template-syntax-error" else "missing.jinja"
    code, err = cli(capsys, "sft", TINY_RECIPE, f"output_dir={tmp_path / 'out'}", f"template.name={name}")
    if case.id == "template-syntax-error":
        refused(code, err, f"chat template {bad}: line 3: Jinja syntax error")
    else:
        refused(code, err, "chat template", "not found: use one of ['phi3', 'phi_instruct']")


@cases(
    Case("recipe-not-utf8", "recipe", "a recipe file with a byte that is not UTF-8", "refused: names file, byte"),
    Case("recipe-not-a-mapping", "recipe", "a recipe that is a YAML list", "refused: a recipe is a mapping"),
    Case("output-dir-is-a-file", "recipe", "`output_dir` names an existing file", "refused before loading: is a file"),
)
def test_broken_recipe_files_and_output_dirs(case, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    if case.id == "recipe-not-utf8":
        recipe.write_bytes(TINY_RECIPE.read_bytes().replace(b"seed: 42", b"seed: 42 # \xff"))
        refused(*cli(capsys, "sft", recipe), f"{recipe}: line ", "not UTF-8 text", "save the recipe as UTF-8")
    elif case.id == "recipe-not-a-mapping":
        recipe.write_text("- sft\n- dpo\n")
        refused(*cli(capsys, "sft", recipe), f"{recipe}: a recipe is a mapping of sections, got list")
    else:
        target = tmp_path / "a-file"
        target.write_text("not a folder")
        refused(*cli(capsys, "sft", TINY_RECIPE, f"output_dir={target}"), f"{target} is a file")
        assert target.read_text() == "not a folder"
