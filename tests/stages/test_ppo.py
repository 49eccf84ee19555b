"""The PPO stage on the offline default: learned reward from the reward stage, policy from SFT (beside DPO), its
held-out gain against a learning-off control, resume, rule-based rewards, refusals, and 2 processes under
accelerate launch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import RecipeError, load_recipe
from finetune.rl.rules import load_rules
from tests.conftest import ROOT, TINY_RECIPE, subprocess_env

# A few small updates: enough to exercise every part (checkpoints every 2, learned + rule reward).
SMALL = [
    "ppo.rollout_batch_size=8",
    "ppo.mini_batches=2",
    "ppo.micro_batch_size=4",
    "ppo.ppo_epochs=2",
    "ppo.response_length=4",
    "ppo.eval_generate_rows=0",
    "ppo.save_every=2",
    "ppo.reward_function=finetune.rl.rewards:exact_answer",
]
TIMING = ("time_generate_s", "time_score_s", "time_optimise_s")


@pytest.fixture(scope="module")
def ppo_runs(sft_run, reward_run, tmp_path_factory):
    """The PPO stage of the offline default as shipped (policy from SFT, the learned reward from the reward stage,
    40 updates), and the same run with the policy's learning rate 0: the control."""
    from finetune import ppo

    recipe = load_recipe(TINY_RECIPE, [f"output_dir={sft_run[2].parent}"])
    shipped = ppo.run(recipe)
    out = tmp_path_factory.mktemp("ppo_control")
    control = ppo.run(
        load_recipe(
            TINY_RECIPE,
            [
                f"output_dir={out}",
                f"ppo.start_from={sft_run[2]}",
                f"ppo.reward_from={reward_run[2]}",
                "ppo.learning_rate=0",
                "samples.count=0",
            ],
        )
    )
    return recipe, shipped, recipe.stage_dir("ppo"), control


@pytest.fixture(scope="module")
def ppo_run(ppo_runs):
    return ppo_runs[:3]


def held_out_gain(m: dict) -> float:
    """Greedy held-out correctness (right and stopped, fixed questions) after the stage minus before it."""
    return m["correct_rate_after"] - m["correct_rate_before"]


def test_ppo_as_shipped_raises_held_out_correctness_and_the_control_does_not(ppo_runs):
    """The RL stage of README command 1: at least 3 more of the 31 fixed held-out questions right (greedy, right
    and stopped), and the held-out learned reward up; with the policy's learning rate 0 the same checks fail."""
    _, trained, _, control = ppo_runs
    assert trained["correct_rate_before"] == control["correct_rate_before"]  # the same start, the same questions
    assert held_out_gain(trained) >= 3 / 31 - 1e-9, trained
    assert not held_out_gain(control) >= 3 / 31 - 1e-9, control  # the same check fails with learning switched off
    assert trained["eval_score_after"] > trained["eval_score_before"]
    assert not control["eval_score_after"] > control["eval_score_before"] + 0.05
    assert trained["base_unchanged"] and control["base_unchanged"]


def test_ppo_as_shipped_reports_every_figure_with_a_bounded_kl(ppo_run):
    recipe, m, out = ppo_run
    assert m["updates"] == recipe.ppo.updates and m["repeated_prompts"] == 496 - 124 and m["train_prompts"] == 124
    assert 0 <= m["kl_end"] < 5 and all(map(torch.isfinite, torch.tensor([m["score_end"], m["kl_end"]])))
    assert 0 <= m["eos_rate_end"] <= 1 and m["base_unchanged"]
    # `ppo.start_from: sft` names the SFT stage's output: the policy is a new LoRA on the SFT model (merged into
    # the base the reward adapter shares), the reference that model with the adapters off
    assert [p.rsplit("/", 1)[-1] for p in m["start_from"]] == ["sft"]
    assert m["policy_initialised_from"] is None and m["reward_from"].endswith("/reward")
    for key in ("correct_rate_before", "correct_rate_after", "correct_rate_sft"):
        assert 0 <= m[key] <= 1, key
    assert m["peak_memory_mb"] > 0 and 0 < m["generation_share"] < 1

    rows = [json.loads(line) for line in (out / "updates.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == list(range(1, recipe.ppo.updates + 1))
    assert {
        "score",
        "kl",
        "response_length",
        "eos_rate",
        "policy_loss",
        "value_loss",
        "clipfrac",
        "approxkl",
        *TIMING,
    } <= set(rows[0])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["score_end"] == m["score_end"] and saved["updates"] == recipe.ppo.updates


def test_ppo_output_is_a_plain_peft_adapter_on_the_sft_model(ppo_run):
    from peft import PeftModel

    from finetune.core.modeling import base_fingerprint, load_model, load_tokenizer

    recipe, m, out = ppo_run
    weights = load_file(str(out / "adapter_model.safetensors"))
    sft = load_file(str(recipe.stage_dir("sft") / "adapter_model.safetensors"))
    assert weights.keys() == sft.keys()  # the same LoRA layout as the adapter it starts on
    assert any(k.endswith("lora_B.weight") and weights[k].abs().max() > 0 for k in weights)  # B starts at 0: trained
    assert (out / "value" / "value_head.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert load_tokenizer(recipe, str(out)).chat_template
    base = load_model(recipe, merge=m["start_from"])
    assert base_fingerprint(base) == m["base_fingerprint"]
    model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_resume_continues_the_same_run(sft_run, reward_run, tmp_path):
    """4 updates straight == 2 updates, stop, resume to 4: same weights, same per-update log."""
    from finetune import ppo

    chained = [f"ppo.start_from={sft_run[2]}", f"ppo.reward_from={reward_run[2]}", *SMALL]
    straight = ppo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path / 'a'}", "ppo.updates=4", *chained]))
    ppo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path / 'b'}", "ppo.updates=2", *chained]))
    resumed = ppo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path / 'b'}", "ppo.updates=4", *chained]))

    assert resumed["resumed_from_update"] == 2 and straight["resumed_from_update"] is None
    a, b = (load_file(str(tmp_path / x / "ppo" / "adapter_model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def log(x):
        rows = [json.loads(line) for line in (tmp_path / x / "ppo" / "updates.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]

    assert log("a") == log("b") and len(log("a")) == 4
    assert sorted(p.name for p in (tmp_path / "b" / "ppo-checkpoints").glob("update-*")) == ["update-2", "update-4"]
    assert "score_rule" in log("a")[0] and "score_learned_raw" in log("a")[0]


def test_a_rule_reward_alone_and_a_function_beside_the_recipe(sft_run, tmp_path):
    from finetune import ppo

    (tmp_path / "my_rules.py").write_text("def short(prompt, response):\n    return -len(response) / 10\n")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(TINY_RECIPE.read_text().replace("../data/", f"{ROOT}/data/"))
    m = ppo.run(
        load_recipe(
            recipe_file,
            [
                f"output_dir={tmp_path}",
                f"ppo.start_from={sft_run[2]}",
                "ppo.reward_from=none",
                "ppo.reward_function=my_rules:short",
                "ppo.updates=2",
                *SMALL[:-1],
            ],
        )
    )
    assert m["reward_from"] is None and m["reward_function"] == "my_rules:short" and m["updates"] == 2
    assert m["policy_initialised_from"] is None  # no reward adapter to share a base with: SFT merged, fresh LoRA
    assert m["score_start"] <= 0  # -len/10 (plus the missing-EOS penalty)

    with pytest.raises(RecipeError, match="ppo.reward_function: 'my_rules' must look like module:function"):
        load_rules(load_recipe(recipe_file, ["ppo.reward_function=my_rules"]), "ppo")
    with pytest.raises(
        RecipeError, match=r"ppo.rewards\[0\]: cannot load 'my_rules:nope'.*a .py file beside the recipe"
    ):
        load_rules(load_recipe(recipe_file, ["ppo.rewards=[{function: my_rules:nope}]"]), "ppo")


def test_missing_stage_outputs_are_refused_before_loading(tmp_path):
    from finetune import ppo

    with pytest.raises(RecipeError, match=r"ppo.start_from: no adapter at .*/sft; run `finetune sft"):
        ppo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"]))
    with pytest.raises(RecipeError, match=r"ppo.start_from: no adapter at .*/dpo; run `finetune dpo"):
        ppo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "ppo.start_from=dpo"]))
    with pytest.raises(RecipeError, match=r"ppo.start_from: ppo is this stage itself; name an earlier stage"):
        ppo.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "ppo.start_from=ppo"]))
    with pytest.raises(RecipeError, match="ppo.reward_from is none and no ppo.reward_function is set"):
        ppo.run(
            load_recipe(
                TINY_RECIPE,
                [f"output_dir={tmp_path}", "ppo.start_from=none", "ppo.reward_from=none", "ppo.reward_function=null"],
            )
        )


def test_two_processes_under_accelerate_launch(sft_run, reward_run, tmp_path):
    """Plain data parallel over one shared base per process: each samples its own prompts, gradients
    are all-reduced, so the two processes end with the same adapters (checked by the stage)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "recipes/accelerate/deepspeed_zero2_cpu.yaml",
        "finetune/ppo.py",
        "recipes/tiny_chat.yaml",
        "deepspeed=deepspeed/zero2.json",
        f"output_dir={tmp_path}",
        f"ppo.start_from={sft_run[2]}",
        f"ppo.reward_from={reward_run[2]}",
        "ppo.updates=2",
        *SMALL,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "PPO done" in res.stderr and "plain data parallel" in res.stderr
    m = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert m["processes"] == 2 and m["updates"] == 2 and m["base_unchanged"] and m["adapters_in_sync"]


def test_held_out_rollout_prompts_are_a_diagnostic(tmp_path, caplog):
    """Held-out prompts too long for the rollouts skip the held-out rollouts with a warning (the stage goes on),
    and a repeated held-out prompt is not reported as dropped: held-out correctness still uses every row."""
    from finetune.core.modeling import load_tokenizer, template_for
    from finetune.rl.stage import load_prompts

    rows = [{"prompt": "What is 2 plus 3? " * 30}, {"prompt": "What is 2 plus 3? " * 30}]
    held_out = tmp_path / "long.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(
        TINY_RECIPE, [f"ppo.data.eval=[{{path: {held_out}}}]", "ppo.max_prompt_length=64", "ppo.rollout_batch_size=8"]
    )
    prompts = load_prompts(recipe, "ppo", load_tokenizer(recipe), template_for(recipe))
    assert prompts.eval_ids == [] and len(prompts.eval_rows) == 2 and prompts.ids
    assert "held-out rollouts skipped" in caplog.text
    assert not prompts.eval_report.drops


def test_a_reward_function_of_the_wrong_arity_stops_the_stage_before_any_model_loads(tmp_path, monkeypatch):
    from finetune import ppo
    from finetune.core import modeling
    from finetune.rl import stage

    def no_model(*args, **kwargs):
        raise AssertionError("the reward functions must be checked before a model loads")

    monkeypatch.setattr(stage, "build_policy_model", no_model)
    monkeypatch.setattr(modeling, "load_tokenizer", no_model)
    (tmp_path / "arity_rules.py").write_text("def judge(prompt):\n    return 1.0\n")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(TINY_RECIPE.read_text().replace("../data/", f"{ROOT}/data/"))
    overrides = [f"output_dir={tmp_path}", "ppo.start_from=none", "ppo.rewards=[{function: arity_rules:judge}]"]
    with pytest.raises(RecipeError, match=r"ppo.rewards\[0\]: reward function arity_rules:judge\(prompt\) cannot be"):
        ppo.run(load_recipe(recipe_file, overrides))
