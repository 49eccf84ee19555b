"""core.serving: the model chat, generate and eval serve. A folder loads as plain transformers would load it (its
chat template, its generation config's end-of-turn); a recipe means its export when complete, else the last
finished chat stage's adapter chain merged into the base in memory, which is exactly base + adapter. The stage
output here is a LoRA adapter on the shipped tiny base with random weights, saved as a stage saves it (no
training)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.chat_template import end_of_turn_ids
from finetune.core.data import DataError
from finetune.core.modeling import add_lora, load_model, load_tokenizer, template_for
from finetune.core.serving import load_base, load_for_chat, load_recipe_model
from finetune.recipe import RecipeError, dump_recipe, load_recipe
from tests.conftest import TINY_RECIPE

PROMPT = "Instruct: What is the capital of France?\nOutput:"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(recipe, its finished sft output): an adapter with non-zero weights, its recipe.yaml and metrics.json."""
    out = tmp_path_factory.mktemp("serving") / "run"
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={out}"])
    torch.manual_seed(0)
    model = add_lora(load_model(recipe), recipe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                p.normal_(0, 0.05)
    folder = recipe.stage_dir("sft")
    model.save_pretrained(folder)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    (folder / "metrics.json").write_text("{}")
    return recipe, folder


def logits(model, tokenizer, text=PROMPT):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_a_recipe_serves_its_last_stage_merged_as_base_plus_adapter(run):
    from peft import PeftModel

    recipe, folder = run
    loaded = load_recipe_model(recipe)
    assert not loaded.model.training
    assert loaded.description == f"sft of {recipe.source} ({folder} merged in memory; not exported yet)"
    base = load_model(recipe.model_copy(update={"precision": "fp32"}))
    expected = logits(PeftModel.from_pretrained(base, folder), loaded.tokenizer)
    served = logits(loaded.model, loaded.tokenizer)
    torch.testing.assert_close(served, expected, atol=1e-4, rtol=1e-4)  # merging reorders float sums
    assert not torch.allclose(served, logits(load_model(recipe), loaded.tokenizer), atol=1e-3)  # not the base


def test_generation_stops_at_the_templates_end_of_turn(run):
    recipe, _ = run
    loaded = load_base(recipe)
    stop = end_of_turn_ids(loaded.tokenizer, template_for(recipe))
    assert loaded.stop_ids == stop
    assert loaded.model.generation_config.eos_token_id == (stop[0] if len(stop) == 1 else stop)
    assert loaded.description == "the base builtin:tiny-phi"
    assert loaded.tokenizer.chat_template == template_for(recipe).source


def test_a_finished_export_is_served_as_a_plain_folder(run, tmp_path):
    recipe, _ = run
    exported = recipe.model_copy(update={"export": recipe.export.model_copy(update={"output": str(tmp_path / "x")})})
    folder = exported.stage_dir("export")
    model = load_model(recipe)
    model.generation_config.eos_token_id = 7  # what export writes: the template's end-of-turn
    model.save_pretrained(folder)
    load_tokenizer(recipe).save_pretrained(folder)  # with the chat template installed
    (folder / "metrics.json").write_text("{}")
    loaded = load_recipe_model(exported)
    assert loaded.description == str(folder) and loaded.stop_ids == [7]
    assert load_for_chat(str(folder), []).description == str(folder)


def test_a_stage_that_takes_models_must_have_finished_when_named(run):
    recipe, _ = run
    with pytest.raises(RecipeError) as e:
        load_recipe_model(recipe, "export", key="eval.model")
    assert f"eval.model: no finished export in {recipe.stage_dir('export')}" in str(e.value)
    assert f"run `finetune export {recipe.source}` first, or name a trained stage" in str(e.value)


def test_a_recipe_with_nothing_finished_says_what_to_run(tmp_path):
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"])
    with pytest.raises(RecipeError, match=r"the model: no finished .* output under .*; run `finetune sft"):
        load_recipe_model(recipe)


def test_a_target_that_is_neither_folder_nor_recipe_says_what_to_give(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_for_chat(str(tmp_path / "nope"), [])
    assert "neither a model folder nor a recipe file" in str(e.value) and "finetune export RECIPE" in str(e.value)


def test_overrides_apply_to_a_recipe_only(tmp_path):
    with pytest.raises(RecipeError, match="key=value overrides apply to a recipe, not to a model folder"):
        load_for_chat(str(tmp_path), ["seed=1"])


def test_an_adapter_folder_is_not_a_model_folder_and_the_message_says_what_to_do(run):
    _, folder = run
    with pytest.raises(RecipeError) as e:
        load_for_chat(str(folder), [])
    assert f"{folder}: no config.json, not a model folder" in str(e.value)
    assert "it holds a LoRA adapter: give the recipe instead, or export it" in str(e.value)


def test_a_model_folder_without_a_chat_template_is_refused(tiny_base):
    with pytest.raises(RecipeError, match="the tokenizer has no chat template; export the model with finetune export"):
        load_for_chat(str(tiny_base), [])


def test_the_input_check_runs_before_the_model_loads(run, tmp_path, monkeypatch):
    recipe, _ = run
    folder = tmp_path / "model"
    load_model(recipe).save_pretrained(folder)
    load_tokenizer(recipe).save_pretrained(folder)
    order = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: order.append("model") or original(*a, **k)
    )

    def check(tokenizer, stop_ids, context):
        order.append(("check", stop_ids, context))
        raise DataError("prompt 3 spells <|endoftext|>")

    with pytest.raises(DataError):
        load_for_chat(str(folder), [], before_model=check)
    generation = json.loads((folder / "generation_config.json").read_text())
    positions = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    assert order == [("check", [generation["eos_token_id"]], positions)]  # refused before any weights were read


def test_a_recipe_model_says_its_context_before_it_loads(run):
    recipe, _ = run
    seen = []
    loaded = load_recipe_model(recipe, before_model=lambda tok, stop, context: seen.append(context))
    assert seen == [loaded.context] and loaded.context == loaded.model.config.max_position_embeddings
