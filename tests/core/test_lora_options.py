"""The lora section's options (DoRA, rsLoRA, LoRA+, modules_to_save, all-linear): each trains its adapter while
the base stays bitwise equal, and each merges exactly (merged == base + adapter), DoRA in a chain included."""

import math

import pytest
import torch

from finetune.core.modeling import (
    LORA_TARGETS,
    LoraPlusOptimizer,
    add_lora,
    base_fingerprint,
    load_model,
    load_stacked,
    not_additive,
    use_loraplus,
)
from finetune.recipe import RecipeError, load_recipe
from tests.conftest import TINY_RECIPE

OPTIONS = {
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "modules_to_save": ["lora.modules_to_save=[lm_head]"],
    "all-linear": ["lora.target_modules=all-linear"],
    "all-together": ["lora.use_dora=true", "lora.use_rslora=true", "lora.modules_to_save=[lm_head]"],
}
IDS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))


def recipe_with(*overrides):
    return load_recipe(TINY_RECIPE, ["output_dir=o", "lora.dropout=0", *overrides])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def train(model, steps=3, lr=1e-2):
    """A few AdamW steps of the language-model loss on one batch: enough to move every trained weight."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_unknown_lora_key_is_refused_with_the_nearest_one():
    with pytest.raises(RecipeError, match="use_dora"):
        load_recipe(TINY_RECIPE, ["output_dir=o", "lora.use_dorra=true"])
    with pytest.raises(RecipeError, match="target_modules"):
        load_recipe(TINY_RECIPE, ["output_dir=o", "lora.target_modules=every-linear"])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_its_adapter_keeps_the_base_and_merges_exactly(option):
    recipe = recipe_with(*OPTIONS[option])
    base = load_model(recipe)
    fingerprint = base_fingerprint(base)
    model = add_lora(base, recipe)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model)
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])}
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)
    assert base_fingerprint(model) == fingerprint  # the frozen base is bitwise what was loaded

    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    if recipe.lora.use_dora:  # DoRA's learned magnitude per output unit is trained too
        assert any("lora_magnitude_vector" in n for n in moved)
    expected = recipe.lora.alpha / (math.sqrt(recipe.lora.r) if recipe.lora.use_rslora else recipe.lora.r)
    assert {m.scaling["default"] for m in layers} == {expected}
    if recipe.lora.modules_to_save:  # a trained copy of the head, the original untouched (in the fingerprint)
        assert any("lm_head.modules_to_save.default" in n for n in moved)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m in layers}
    assert names == set(LORA_TARGETS["phi"])  # all-linear finds the same six in Phi; never the LM head

    unmerged = logits(model)
    merged = logits(model.merge_and_unload())
    assert (merged - unmerged).abs().max() < 1e-4  # merged == base + adapter (fp32)


def test_loraplus_gives_lora_b_the_ratio_through_the_trainers_optimizer_hook(tmp_path):
    """LoRA+ goes through the Trainer's own create_optimizer (what DeepSpeed and FSDP call too): lora_B at
    lr x ratio, lora_A at lr. Control: without the option every trained weight has the Trainer's one lr."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    def optimizer_of(*overrides):
        recipe = recipe_with(*overrides)
        model = add_lora(load_model(recipe), recipe)
        args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, use_cpu=True, report_to=[])
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": [[1, 2]]}))
        use_loraplus(trainer, recipe)
        optimizer = trainer.create_optimizer()
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}

    lrs = optimizer_of("lora.loraplus_lr_ratio=16")
    assert [lr for n, lr in lrs.items() if "lora_B" in n] == pytest.approx([16e-3] * 24)  # 4 layers x 6 modules
    assert [lr for n, lr in lrs.items() if "lora_A" in n] == pytest.approx([1e-3] * 24)
    assert list(optimizer_of().values()) == pytest.approx([1e-3] * 48)
    assert isinstance(LoraPlusOptimizer(None, 2.0)(), type(LoraPlusOptimizer(None, 2.0).build))


def test_a_dora_chain_is_checked_against_the_model_it_was_trained_on(tmp_path):
    """Two DoRA adapters, the second trained on the first merged in (as DPO on SFT). DoRA rescales W + BA per
    column, so stacking both on the base is not the trained model (the control below shows how far off); the
    export's reference merges the first and keeps the last unmerged, and the merged chain equals it."""
    recipe = recipe_with("lora.use_dora=true")
    first = train(add_lora(load_model(recipe), recipe))
    first.save_pretrained(tmp_path / "first")
    second = train(add_lora(load_model(recipe, merge=[str(tmp_path / "first")]), recipe))
    second.save_pretrained(tmp_path / "second")
    chain = [str(tmp_path / "first"), str(tmp_path / "second")]
    assert not_additive(chain[0]) and not not_additive(_plain_adapter(recipe, tmp_path))

    merged = logits(load_model(recipe, merge=chain))
    reference = logits(load_stacked(recipe, chain))
    assert (merged - reference).abs().max() < 1e-4
    naive = logits(_stacked_on_the_base(recipe, chain))
    assert (merged - naive).abs().max() > 1e-3


def _plain_adapter(recipe, tmp_path):
    plain = recipe_with()
    add_lora(load_model(plain), plain).save_pretrained(tmp_path / "plain")
    return str(tmp_path / "plain")


def _stacked_on_the_base(recipe, chain):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(recipe), chain[0], adapter_name="a0")
    model.load_adapter(chain[1], adapter_name="a1")
    model.base_model.set_adapter(["a0", "a1"], inference_mode=True)
    return model.eval()
