"""core.lineage: which adapters make a stage output's model, checked when read (present, same base and template,
the content it was trained on), and what every output records it is made from. Stage outputs here are tiny
folders written by hand (an adapter is two files to lineage); nothing trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from finetune.core import fingerprints
from finetune.core.fingerprints import adapter_hash, adapter_record, digest
from finetune.core.integrity import DamagedFileError
from finetune.core.lineage import (
    adapter_chain,
    chat_model_stage,
    check_adapter_folder,
    check_not_being_written,
    fp32_recipe,
    input_keys,
    input_record,
    model_chain,
    stamp,
    start_chain,
    upstream,
)
from finetune.recipe import STAGES, RecipeError, load_recipe
from tests.adversarial.cases import lock_held_by_another_process
from tests.conftest import TINY_RECIPE

FIX = "run the sft stage first"


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe(TINY_RECIPE, [f"output_dir={tmp_path / 'run'}"])


def output(folder: Path, value: float = 0.0, start_from=(), model="builtin:tiny-phi", template="phi_instruct"):
    """A finished stage output as lineage sees it: an adapter (weights + config), the recipe it was made with and
    its metrics.json (the adapters it started from, recorded as a stage records them)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lora_A": torch.full((2, 2), value)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2}))
    (folder / "recipe.yaml").write_text(
        yaml.safe_dump({"model": {"name_or_path": model}, "template": {"name": template}})
    )
    records = [adapter_record(f, folder) for f in start_from]
    (folder / "metrics.json").write_text(json.dumps({"start_from": records} if records else {}))
    return folder


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(fingerprints, "_hashes", {})


# ----------------------------------------------------------------------------- an adapter folder, checked


def test_a_folder_without_an_adapter_names_the_key_and_the_fix(recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError) as e:
        check_adapter_folder(recipe, "dpo.start_from", tmp_path / "empty", FIX)
    assert str(e.value) == f"{recipe.source}: dpo.start_from: no adapter at {tmp_path / 'empty'}; {FIX}"


def test_an_adapter_of_the_same_base_and_template_passes(recipe, tmp_path):
    folder = output(tmp_path / "sft")
    assert check_adapter_folder(recipe, "dpo.start_from", folder, FIX) == folder


@pytest.mark.parametrize(
    "part, made, says",
    [
        ("model", {"model": "microsoft/phi-2"}, "was trained with model 'microsoft/phi-2', this recipe uses 'builtin:"),
        ("template", {"template": "chatml"}, "was trained with template 'chatml', this recipe uses 'phi_instruct'"),
    ],
)
def test_an_adapter_of_another_base_or_template_is_refused(recipe, tmp_path, part, made, says):
    folder = output(tmp_path / "sft", **made)
    with pytest.raises(RecipeError) as e:
        check_adapter_folder(recipe, "dpo.start_from", folder, FIX)
    assert f"dpo.start_from: {folder} {says}" in str(e.value)
    assert "point it at an output of the same base model and template" in str(e.value)


@pytest.mark.parametrize("damage", ["config", "weights", "recipe"])
def test_a_damaged_adapter_folder_names_the_file_and_the_fix(recipe, tmp_path, damage):
    folder = output(tmp_path / "sft")
    file = {
        "config": folder / "adapter_config.json",
        "weights": folder / "adapter_model.safetensors",
        "recipe": folder / "recipe.yaml",
    }[damage]
    file.write_bytes(file.read_bytes()[:-3] if damage == "weights" else b"{: [")
    with pytest.raises(DamagedFileError) as e:
        check_adapter_folder(recipe, "dpo.start_from", folder, FIX)
    assert str(e.value).startswith(f"{file}: damaged (")
    if damage != "recipe":
        assert str(e.value).endswith(f"the output is damaged; {FIX}")


# ----------------------------------------------------------------------------- the chain


def test_a_chain_is_the_adapters_it_started_from_then_its_own(tmp_path):
    sft = output(tmp_path / "run" / "sft", 1.0)
    dpo = output(tmp_path / "run" / "dpo", 2.0, start_from=[sft])
    assert adapter_chain(sft) == [str(sft)]
    assert adapter_chain(dpo) == [str(sft.resolve()), str(dpo)]


def test_a_run_folder_moved_as_a_whole_keeps_its_chain(tmp_path):
    sft = output(tmp_path / "run" / "sft", 1.0)
    output(tmp_path / "run" / "dpo", 2.0, start_from=[sft])
    shutil.move(tmp_path / "run", tmp_path / "moved")
    moved = tmp_path / "moved"
    assert adapter_chain(moved / "dpo") == [str((moved / "sft").resolve()), str(moved / "dpo")]


def test_an_output_copied_alone_finds_its_start_at_the_recorded_absolute_path(tmp_path):
    sft = output(tmp_path / "run" / "sft", 1.0)
    output(tmp_path / "run" / "dpo", 2.0, start_from=[sft])
    shutil.copytree(tmp_path / "run" / "dpo", tmp_path / "copies" / "deep" / "dpo")
    assert adapter_chain(tmp_path / "copies" / "deep" / "dpo")[0] == str(sft.resolve())


def test_a_start_adapter_that_is_gone_is_named_with_the_fix(tmp_path):
    sft = output(tmp_path / "run" / "sft", 1.0)
    dpo = output(tmp_path / "run" / "dpo", 2.0, start_from=[sft])
    shutil.rmtree(sft)
    with pytest.raises(RecipeError) as e:
        adapter_chain(dpo)
    assert f"{dpo}: it was trained on top of the adapter at {sft.resolve()}" in str(e.value)
    assert "not there any more" in str(e.value) and "finetune pipeline RECIPE" in str(e.value)


def test_a_start_adapter_changed_since_is_refused_never_merged(tmp_path):
    sft = output(tmp_path / "run" / "sft", 1.0)
    dpo = output(tmp_path / "run" / "dpo", 2.0, start_from=[sft])
    recorded = adapter_hash(sft)
    output(sft, 3.0)  # the sft stage ran again
    with pytest.raises(RecipeError) as e:
        adapter_chain(dpo)
    message = str(e.value)
    assert f"as it was then (sha256 {recorded[:12]})" in message and f"(sha256 {adapter_hash(sft)[:12]})" in message
    assert "Merging it would make a different model than the one measured" in message


def test_paths_recorded_before_content_was_recorded_still_work(tmp_path):
    sft = output(tmp_path / "run" / "sft", 1.0)
    dpo = output(tmp_path / "run" / "dpo", 2.0)
    (dpo / "metrics.json").write_text(json.dumps({"start_from": [str(tmp_path / "old-place" / "sft")]}))
    assert adapter_chain(dpo) == [str(sft), str(dpo)]  # the recorded path is gone: the folder beside it
    (dpo / "metrics.json").write_text(json.dumps({"start_from": [str(sft)]}))
    assert adapter_chain(dpo) == [str(sft), str(dpo)]


def test_a_damaged_metrics_file_is_named(tmp_path):
    dpo = output(tmp_path / "run" / "dpo")
    (dpo / "metrics.json").write_text("{")
    with pytest.raises(DamagedFileError, match="run the stage that made it again"):
        adapter_chain(dpo)


# ----------------------------------------------------------------------------- what a recipe's stages read


def test_start_chain_follows_the_default_and_none(recipe):
    with pytest.raises(RecipeError) as e:
        start_chain(recipe, "dpo")
    assert f"dpo.start_from: no adapter at {recipe.stage_dir('sft')}" in str(e.value)
    assert f"run `finetune sft {recipe.source}` first" in str(e.value) and "set dpo.start_from to none" in str(e.value)
    sft = output(recipe.stage_dir("sft"))
    assert start_chain(recipe, "dpo") == [str(sft)]
    no_start = recipe.model_copy(update={"dpo": recipe.dpo.model_copy(update={"start_from": "none"})})
    assert start_chain(no_start, "dpo") == []


def test_auto_takes_the_last_finished_chat_model_stage_in_pipeline_order(recipe):
    chat = STAGES.chat_model_stages()
    with pytest.raises(RecipeError) as e:
        chat_model_stage(recipe, "auto", "export.stage")
    assert f"export.stage: no finished {', '.join(chat[:-1])} or {chat[-1]} output" in str(e.value)
    assert f"run `finetune {chat[0]} {recipe.source}`" in str(e.value)
    output(recipe.stage_dir("sft"))
    assert chat_model_stage(recipe, "auto", "export.stage") == "sft"
    output(recipe.stage_dir("dpo"))
    assert chat_model_stage(recipe, "auto", "export.stage") == "dpo"


def test_a_named_stage_must_be_finished(recipe):
    with pytest.raises(RecipeError) as e:
        chat_model_stage(recipe, "dpo", "export.stage")
    assert f"export.stage: dpo has no finished output in {recipe.stage_dir('dpo')}" in str(e.value)
    assert f"run `finetune dpo {recipe.source}` first" in str(e.value)


def test_a_model_chain_checks_every_adapter_in_it(recipe):
    sft = output(recipe.stage_dir("sft"), model="microsoft/phi-2")
    output(recipe.stage_dir("dpo"), start_from=[sft])
    with pytest.raises(RecipeError) as e:
        model_chain(recipe, "dpo", "export.stage")
    assert "export.stage" in str(e.value) and "was trained with model 'microsoft/phi-2'" in str(e.value)


def test_the_keys_through_which_a_stage_reads_earlier_outputs():
    for stage in STAGES:
        keys = input_keys(stage.name)
        assert set(k for k in stage.inputs.values() if k) <= set(keys)
        assert (stage.model_choice in keys) == bool(stage.takes_models and stage.model_choice)
    assert input_keys("sft") == [] and input_keys("ppo") == ["start_from", "reward_from"]


def test_upstream_is_what_the_recipe_points_at_now(recipe):
    assert upstream(recipe, "ppo") == {"start_from": [], "reward_from": []}  # nothing has run yet
    sft = output(recipe.stage_dir("sft"), 1.0)
    dpo = output(recipe.stage_dir("dpo"), 2.0, start_from=[sft])
    reward = output(recipe.stage_dir("reward"), 3.0, start_from=[sft])
    assert upstream(recipe, "ppo") == {  # the tiny recipe's ppo.start_from: sft
        "start_from": [str(sft)],
        "reward_from": [str(sft.resolve()), str(reward)],
    }
    after_dpo = load_recipe(TINY_RECIPE, [f"output_dir={recipe.output_dir}", "ppo.start_from=dpo"])
    assert upstream(after_dpo, "ppo")["start_from"] == [str(sft.resolve()), str(dpo)]
    assert upstream(recipe, "export") == {"stage": [str(sft.resolve()), str(dpo)]}  # auto: the last chat stage


def test_an_rl_policy_shares_the_reward_models_base_with_a_relative_output_dir(tmp_path, monkeypatch):
    """README command 1's output_dir is relative (runs/tiny_chat): the policy's chain then names the SFT folder
    relatively while the reward model records it absolutely; the RL stage must see one folder, not two bases."""
    from finetune.rl.stage import resolve_start

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(TINY_RECIPE, ["output_dir=runs/tiny"])
    sft = output(recipe.stage_dir("sft"))
    assert not sft.is_absolute()
    reward = output(recipe.stage_dir("reward"), 1.0, start_from=[sft])
    dpo = output(recipe.stage_dir("dpo"), 2.0, start_from=[sft])
    shared, policy, scorer = resolve_start(recipe, "ppo")  # ppo.start_from: sft
    assert [Path(p).resolve() for p in shared] == [sft.resolve()] and policy is None
    assert Path(scorer).resolve() == reward.resolve()
    shared, policy, _ = resolve_start(load_recipe(TINY_RECIPE, ["output_dir=runs/tiny", "ppo.start_from=dpo"]), "ppo")
    assert [Path(p).resolve() for p in shared] == [sft.resolve()] and Path(policy).resolve() == dpo.resolve()
    # the model card of an export of PPO names each folder's role by the folder, not by how it was spelt
    from finetune.export import model_card

    ppo = output(recipe.stage_dir("ppo"), 4.0, start_from=[sft])
    for folder, extra in ((sft, {}), (reward, {}), (dpo, {}), (ppo, {"reward_from": str(reward)})):  # relative
        metrics = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**metrics, "updates": 1, **extra}))  # a finished output
    card = model_card(recipe, "ppo", adapter_chain(ppo), {"dtype": "fp32"}, "<|endoftext|>")
    assert "| sft | merged into this model |" in card and "| ppo | merged into this model |" in card
    assert "| reward | scored PPO's samples (not part of this model) |" in card
    assert "| dpo | not part of this model |" in card


def test_a_merged_model_is_recorded_by_the_fingerprint_it_records(tmp_path):
    merged = tmp_path / "export"
    merged.mkdir()
    (merged / "metrics.json").write_text(json.dumps({"fingerprint": "f" * 64}))
    record = input_record(merged, tmp_path / "eval")
    assert record["sha256"] == "f" * 64 and record["path"] == "../export"


# ----------------------------------------------------------------------------- what an output is made from


def test_stamp_records_the_start_adapters_and_a_fingerprint_of_what_it_is_made_from(recipe):
    sft = output(recipe.stage_dir("sft"), 1.0)
    stamped = stamp(recipe, "dpo", {"train_loss": 0.5, "start_from": [str(sft)]}, {"start_from": [str(sft)]})
    assert stamped["train_loss"] == 0.5
    assert stamped["start_from"] == [{"path": "../sft", "absolute": str(sft.resolve()), "sha256": adapter_hash(sft)}]
    assert stamped["made_from"]["inputs"] == {"start_from": [adapter_hash(sft)]}
    assert stamped["fingerprint"] == digest(stamped["made_from"])
    output(sft, 5.0)  # the adapter it starts from made again: another fingerprint
    again = stamp(recipe, "dpo", {"start_from": [str(sft)]}, {"start_from": [str(sft)]})
    assert again["fingerprint"] != stamped["fingerprint"]


def test_merging_loads_the_base_at_full_precision(recipe):
    half = recipe.model_copy(update={"precision": "bf16"})
    merged = fp32_recipe(half)
    assert merged.precision == "fp32" and not merged.model.load_in_4bit and half.precision == "bf16"


def test_an_output_another_process_is_writing_is_not_read(recipe):
    folder = recipe.stage_dir("sft").parent
    folder.mkdir(parents=True)
    check_not_being_written(recipe, ["sft"], "finetune dpo")  # nobody writing: fine
    with lock_held_by_another_process(folder, "sft") as proc:
        with pytest.raises(RecipeError) as e:
            check_not_being_written(recipe, ["reward", "sft"], "finetune dpo")
    message = str(e.value)
    assert f"finetune dpo: the sft stage is being written into {recipe.stage_dir('sft')} right now" in message
    assert f"pid {proc.pid}" in message and "wait for it to finish, or stop it" in message
