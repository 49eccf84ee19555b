"""samples.jsonl: the fixed held-out prompts every chat-model stage answers (chosen from the recipe alone)."""

import json

from finetune.core.evaluation import Samples, sample_prompts
from finetune.core.outputs import SAMPLES_FILE, write_samples
from finetune.recipe import load_recipe
from tests.conftest import ROOT, TINY_RECIPE


def test_sample_prompts_are_fixed_distinct_first_turns_of_the_held_out_data():
    recipe = load_recipe(TINY_RECIPE)
    prompts = sample_prompts(recipe)
    assert len(prompts) == recipe.samples.count == 4
    assert prompts == sample_prompts(load_recipe(TINY_RECIPE))  # every stage of the recipe gets the same
    assert all(p[-1]["role"] == "user" and [m["role"] for m in p].count("user") == 1 for p in prompts)
    assert len({json.dumps(p) for p in prompts}) == 4
    held_out = (ROOT / "data/tiny/sft_eval.jsonl").read_text()
    assert all(json.dumps(p[-1]["content"]) in held_out for p in prompts)
    other = sample_prompts(load_recipe(TINY_RECIPE, ['samples.data=[{"path": "../data/tiny/pref_eval.jsonl"}]']))
    assert other != prompts and all(
        json.dumps(p[-1]["content"]) in (ROOT / "data/tiny/pref_eval.jsonl").read_text() for p in other
    )
    assert sample_prompts(load_recipe(TINY_RECIPE, ["samples.count=0"])) == []


def test_unreadable_sample_prompts_never_stop_a_stage(caplog):
    samples = Samples(load_recipe(TINY_RECIPE, ['samples.data=[{"path": "missing.jsonl"}]']))
    assert samples.prompts == [] and samples.rows() == []
    assert "samples.jsonl skipped" in caplog.text


def test_samples_file_has_one_row_per_prompt_and_a_key_per_model(tmp_path):
    samples = Samples(load_recipe(TINY_RECIPE), prompts=[[{"role": "user", "content": "What is 2 plus 3?"}]])
    samples.replies = {"start": ["6"], "dpo": ["5"]}
    write_samples(tmp_path, samples.rows())
    rows = [json.loads(x) for x in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert rows == [
        {
            "prompt": "What is 2 plus 3?",
            "messages": [{"role": "user", "content": "What is 2 plus 3?"}],
            "start": "6",
            "dpo": "5",
        }
    ]


def test_chat_stages_save_their_replies_and_a_resumed_ppo_its_start(pipeline_run):
    """On the session's pipeline (PPO killed after update 4 and resumed): every chat-model stage wrote the
    same prompts with its start's and its own replies; the reward model (not a chat model) wrote none; PPO's
    start is the SFT model (ppo.start_from: sft) even though PPO resumed from a checkpoint."""
    out = pipeline_run["out"]
    read = {
        s: [json.loads(x) for x in (out / s / SAMPLES_FILE).read_text().splitlines()] for s in ("sft", "dpo", "ppo")
    }
    assert not (out / "reward" / SAMPLES_FILE).exists()
    prompts = [r["prompt"] for r in read["sft"]]
    assert len(prompts) == 4 and all([r["prompt"] for r in rows] == prompts for rows in read.values())
    assert all({"base", "sft"} <= set(r) for r in read["sft"]) and all({"start", "ppo"} <= set(r) for r in read["ppo"])
    assert [r["start"] for r in read["ppo"]] == [r["sft"] for r in read["sft"]]  # greedy: the same model
    ppo, sft = (json.loads((out / s / "metrics.json").read_text()) for s in ("ppo", "sft"))
    assert ppo["resumed_from_update"] and ppo["correct_rate_before"] == sft["correct_rate_after"]
