"""Reward model and DPO chained from the SFT output of the offline default."""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import RecipeError, load_recipe
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def chained(sft_run):
    _, _, sft_out = sft_run
    return [f"output_dir={sft_out.parent}"]


def test_dpo_prefers_the_correct_answer_on_held_out_pairs(dpo_run):
    _, m, _ = dpo_run
    assert m["start_from"][0].endswith("/sft")
    assert m["eval_rewards_accuracy_before"] == 0.0 and m["eval_rewards_margin_before"] == 0.0  # policy == reference
    # 123 held-out pairs. Shipped runs measure 93-94% (the bar is 0.9); the test leaves room
    # for another CPU's rounding over the 4,000-step base build.
    assert m["eval_rewards_accuracy"] >= 0.85 and m["eval_rewards_margin"] > 0
    assert m["eval_loss"] < m["eval_loss_before"]
    assert m["correct_rate_after"] >= m["correct_rate_start"] + 0.05  # at least as correct as SFT (74-84% -> 90-97%)
    assert m["base_unchanged"]


def test_reward_stage_trains_and_saves_its_score_head(reward_run):
    _, m, out = reward_run
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("score" in k for k in weights) and any("lora_B" in k for k in weights)
    assert m["base_unchanged"] and m["global_steps"] > 0
    # held-out facts, 123 pairs: ~90-94% (bar 0.9; room as for DPO above); the untrained head's
    # accuracy depends on its random init (35-69% seen)
    assert m["eval_accuracy"] >= 0.85 and m["eval_accuracy"] >= m["eval_accuracy_before"] + 0.1
    assert set(json.loads((out / "metrics.json").read_text())) >= {"eval_accuracy_before", "eval_accuracy"}
    assert all(torch.isfinite(torch.tensor([m["eval_margin"], m["train_loss"]])))


def test_start_from_a_mismatched_or_missing_output_is_refused(chained, tmp_path, sft_run):
    from finetune import dpo

    with pytest.raises(RecipeError, match="was trained with template 'phi_instruct', this recipe uses 'phi3'"):
        dpo.run(load_recipe(TINY_RECIPE, chained + ["template.name=phi3"]))
    with pytest.raises(RecipeError, match="dpo.start_from: no adapter at .*run the stage that makes it first"):
        dpo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"]))


def test_a_moved_output_folder_keeps_its_adapter_chain(tmp_path):
    from finetune.core.lineage import adapter_chain

    for stage in ("sft", "elsewhere"):
        (tmp_path / "new" / stage).mkdir(parents=True)
        (tmp_path / "new" / stage / "adapter_config.json").write_text("{}")
    dpo = tmp_path / "new" / "dpo"
    dpo.mkdir()
    gone, kept = str(tmp_path / "old" / "sft"), str(tmp_path / "new" / "elsewhere")
    (dpo / "metrics.json").write_text(json.dumps({"start_from": [gone, kept]}))
    # the recorded SFT folder was moved along with the DPO one: found beside it; an existing path stays
    assert adapter_chain(dpo) == [str(tmp_path / "new" / "sft"), kept, str(dpo)]


def test_held_out_correctness_counts_a_shared_prompt_once(monkeypatch):
    from finetune.core import evaluation

    asked = []
    monkeypatch.setattr(
        evaluation,
        "generate_answers",
        lambda model, tok, template, prompts, n, **kwargs: asked.extend(prompts) or ["7"] * len(prompts),
    )
    q = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    rows = [{"prompt": q("3 plus 4?"), "answer": "7", "rejected": r} for r in ("6", "8", "9")]
    rows += [{"prompt": q("2 plus 2?"), "answer": "4"}, {"prompt": q("no answer")}]
    rate, replies = evaluation.held_out_correctness(None, None, None, rows, limit=64, max_new_tokens=4)
    assert asked == [q("3 plus 4?"), q("2 plus 2?")] and rate == 0.5  # not 3 of 4 rows right
    rate, _ = evaluation.held_out_correctness(None, None, None, rows, limit=1, max_new_tokens=4)
    assert rate == 1.0  # the limit counts distinct prompts
