"""The GRPO stage on the offline default: `finetune grpo` after the session's SFT run (a new policy LoRA on the
SFT model, the shipped rule reward), its output, resume, export of its output, and the refusals (no reward;
vLLM without vLLM or without CUDA)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import RecipeError, load_recipe
from tests.conftest import TINY_RECIPE

# A few small updates: enough to exercise every part (checkpoints every 2, held-out figures, samples).
SMALL = [
    "grpo.rollout_batch_size=4",
    "grpo.num_generations=4",
    "grpo.micro_batch_size=16",
    "grpo.max_completion_length=4",
    "grpo.eval_generate_rows=16",
    "grpo.eval_prompts=8",
    "grpo.save_every=2",
    "samples.count=2",
]
TIMING = ("time_generate_s", "time_score_s", "time_optimise_s")


def recipe_for(out, sft_out, *extra):
    return load_recipe(TINY_RECIPE, [f"output_dir={out}", f"grpo.start_from={sft_out}", *SMALL, *extra])


@pytest.fixture(scope="session")
def grpo_run(sft_run, tmp_path_factory):
    """`finetune grpo` on the tiny recipe after the session's SFT run (its own output_dir, so the session's
    other stages never see a GRPO output)."""
    from finetune.cli import main

    out = tmp_path_factory.mktemp("grpo_run")
    args = [f"output_dir={out}", f"grpo.start_from={sft_run[2]}", "grpo.updates=3", *SMALL]
    assert main(["grpo", str(TINY_RECIPE), *args]) == 0
    return load_recipe(TINY_RECIPE, args), json.loads((out / "grpo" / "metrics.json").read_text()), out / "grpo"


def test_grpo_runs_after_sft_and_reports_its_figures(grpo_run, sft_run, capsys):
    from finetune.core.lineage import adapter_chain

    recipe, m, out = grpo_run
    assert m["updates"] == 3 and m["base_unchanged"] and m["adapters_in_sync"]
    assert adapter_chain(out) == [str(sft_run[2]), str(out)]  # a new policy LoRA on the SFT model
    assert m["policy_initialised_from"] is None and m["reward_from"] is None
    assert m["reward_function"] == "finetune.rl.rewards:exact_answer" and m["loss_type"] == "dapo"
    # the older key is a one-term `rewards` list, scored as PPO scores it
    assert m["rewards"] == [
        {"term": "exact_answer", "function": "finetune.rl.rewards:exact_answer", "weight": 1.0, "kwargs": {}}
    ]
    assert m["reward_exact_answer_end"] == m["score_rule_end"]
    assert 0 <= m["reward_start"] <= 1 and 0 <= m["reward_end"] <= 1 and m["score_rule_end"] == m["reward_end"]
    for key in ("correct_rate_before", "correct_rate_after", "eval_eos_rate_before", "eval_eos_rate_after"):
        assert 0 <= m[key] <= 1, key
    # the start is the SFT model: held-out correctness before GRPO is about SFT's own (other rows, the same facts)
    assert m["correct_rate_before"] == pytest.approx(sft_run[1]["correct_rate_after"], abs=0.13)
    assert m["eval_kl_before"] == 0.0 and m["eval_kl_after"] >= 0  # step 0: the policy is the reference
    assert m["peak_memory_mb"] > 0 and 0 < m["generation_share"] < 1 and m["train_prompts"] == 124
    rows = [json.loads(line) for line in (out / "updates.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [1, 2, 3]
    expected = {"reward", "reward_std", "frac_reward_zero_std", "policy_loss", "clip_ratio_low", "eos_rate", *TIMING}
    assert expected <= set(rows[0]) and "kl" not in rows[0]  # beta 0: no reference forward, no KL term
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"start", "grpo"} <= set(samples[0])
    assert not (out / "value").exists()  # no critic


def test_grpo_output_is_a_plain_peft_adapter_on_the_sft_model(grpo_run):
    from peft import PeftModel

    from finetune.core.lineage import adapter_chain
    from finetune.core.modeling import base_fingerprint, load_model

    recipe, m, out = grpo_run
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it learnt something
    base = load_model(recipe, merge=adapter_chain(out)[:-1])
    assert base_fingerprint(base) == m["base_fingerprint"]
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_export_of_a_grpo_output(grpo_run):
    from finetune import export

    recipe, m, out = grpo_run
    exported = export.run(load_recipe(TINY_RECIPE, [f"output_dir={out.parent}", "export.stage=grpo"]))
    assert exported["stage"] == "grpo" and [Path(a).name for a in exported["adapters"]] == ["sft", "grpo"]
    assert exported["parity_max_abs_diff_fp32"] <= 1e-4
    card = (out.parent / "export" / "README.md").read_text()
    assert "| grpo | merged into this model |" in card


def test_resume_continues_the_same_run(sft_run, tmp_path):
    """2 updates straight == 1 update, stop, resume to 2: same weights, same per-update log."""
    from finetune import grpo

    straight = grpo.run(recipe_for(tmp_path / "a", sft_run[2], "grpo.updates=2", "grpo.save_every=1"))
    grpo.run(recipe_for(tmp_path / "b", sft_run[2], "grpo.updates=1", "grpo.save_every=1"))
    resumed = grpo.run(recipe_for(tmp_path / "b", sft_run[2], "grpo.updates=2", "grpo.save_every=1"))
    assert resumed["resumed_from_update"] == 1 and straight["resumed_from_update"] is None
    a, b = (load_file(str(tmp_path / x / "grpo" / "adapter_model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(x):
        rows = [json.loads(line) for line in (tmp_path / x / "grpo" / "updates.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # timings differ

    assert log("a") == log("b") and len(log("a")) == 2


def test_refusals_before_anything_loads(tmp_path, monkeypatch):
    import importlib.util

    from finetune import grpo

    with pytest.raises(RecipeError, match="grpo.reward_from is none and no grpo.reward_function is set"):
        grpo.run(
            load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "grpo.start_from=none", "grpo.reward_function=null"])
        )
    with pytest.raises(RecipeError, match=r"grpo.start_from: no adapter at .*/sft; run `finetune sft"):
        grpo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"]))
    with pytest.raises(RecipeError, match="grpo.mini_batches: 3 does not divide the 248 completions"):
        grpo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "grpo.mini_batches=3"]))
    # vLLM: one clear message when it is not installed, and when it is but there is no CUDA
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(RecipeError, match=r"grpo.use_vllm: vLLM is not installed\. `pip install 'finetune\[vllm\]'`"):
        grpo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "grpo.use_vllm=true"]))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="ppo.use_vllm: vLLM needs a CUDA GPU and this machine has none"):
        from finetune import ppo

        ppo.check_settings(load_recipe(TINY_RECIPE, ["ppo.use_vllm=true"]), True)
    assert not (tmp_path / "grpo").exists()


@pytest.fixture(scope="module")
def grpo_learning(sft_run, tmp_path_factory):
    """The shipped GRPO section as it is (the exact-answer rule, from the session's SFT model), and the same run
    with learning switched off (learning_rate 0: the control)."""
    from finetune.cli import main

    runs = {}
    for name, extra in (("trained", []), ("control", ["grpo.learning_rate=0"])):
        out = tmp_path_factory.mktemp(f"grpo_{name}")
        args = [f"output_dir={out}", f"grpo.start_from={sft_run[2]}", "samples.count=0", *extra]
        assert main(["grpo", str(TINY_RECIPE), *args]) == 0
        runs[name] = json.loads((out / "grpo" / "metrics.json").read_text())
    return runs


def test_grpo_raises_held_out_correctness_and_the_control_does_not(grpo_learning):
    """Greedy correctness (right and stopped) on the fixed held-out questions, before and after."""
    trained, control = grpo_learning["trained"], grpo_learning["control"]
    gain = {name: m["correct_rate_after"] - m["correct_rate_before"] for name, m in grpo_learning.items()}
    assert trained["correct_rate_before"] == control["correct_rate_before"]
    assert gain["trained"] >= 0.05, trained  # at least 2 of the 31 questions more
    assert not gain["control"] >= 0.05, control  # the same check fails with learning switched off
