"""QLoRA at every stage: a tiny SFT -> reward -> DPO -> PPO chain with `model.load_in_4bit` on bitsandbytes'
CPU backend (NF4 in plain torch ops; bitsandbytes 0.50), then the export, which merges the same adapters into
the original fp32 weights with its parity check. Each later stage merges the earlier adapters into the original
weights and quantises that (finetune.core.modeling.quantised_merge): here it is watched doing so."""

import json

import pytest
import torch
from safetensors.torch import load_file

import finetune.core.modeling as modeling
from finetune.recipe import load_recipe
from tests.conftest import TINY_RECIPE

pytestmark = pytest.mark.timeout(1200)

FOUR_BIT = [
    "precision=bf16",  # the 4-bit compute dtype (fp16 needs CUDA)
    "model.load_in_4bit=true",
    "samples.count=0",
    "training.per_device_train_batch_size=4",
    "training.per_device_eval_batch_size=8",
    "training.warmup_steps=0",
    "sft.max_steps=2",
    "sft.eval_generate_rows=0",
    "sft.data.max_eval_rows=4",
    "reward.max_steps=1",
    "reward.data.max_eval_rows=4",
    "dpo.max_steps=1",
    "dpo.eval_generate_rows=0",
    "dpo.data.max_eval_rows=4",
    "ppo.updates=1",
    "ppo.save_every=1",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batches=1",
    "ppo.micro_batch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.response_length=4",
    "ppo.eval_generate_rows=0",
    "ppo.eval_prompts=0",
    # the 4-bit reward model in place of the recipe's rule (a 2-step SFT model's exact answers all score 0)
    "grpo.reward_function=null",
    "grpo.rewards=[{model: null}]",
    "grpo.updates=1",
    "grpo.save_every=1",
    "grpo.rollout_batch_size=2",
    "grpo.num_generations=2",
    "grpo.micro_batch_size=4",
    "grpo.max_completion_length=4",
    "grpo.eval_generate_rows=0",
    "grpo.eval_prompts=0",
    "export.eval_generate_rows=0",
    "export.parity_prompts=2",
]


def test_reward_dpo_ppo_and_grpo_train_on_a_4bit_base_and_the_export_keeps_parity(tmp_path, monkeypatch):
    import bitsandbytes as bnb

    from finetune import dpo, export, grpo, ppo, reward, sft

    if torch.cuda.is_available():
        pytest.skip("CUDA present: bench/gpu.py runs the 4-bit chain on the GPU")
    quantised = []  # (chain length, Linear4bit modules) of every merged-then-quantised base

    real = modeling.quantised_merge

    def watched(recipe, task, device_map, merge, **extra):
        model = real(recipe, task, device_map, merge, **extra)
        quantised.append((len(merge), sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())))
        return model

    monkeypatch.setattr(modeling, "quantised_merge", watched)
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", *FOUR_BIT])
    results = {stage.__name__.rsplit(".", 1)[-1]: stage.run(recipe) for stage in (sft, reward, dpo, ppo, grpo)}

    # reward, DPO, PPO and GRPO each started from the SFT adapter merged into the original weights, then quantised
    assert quantised == [(1, 4 * 6)] * 4
    for stage, m in results.items():
        assert m["base_unchanged"], stage
        weights = load_file(str(tmp_path / stage / "adapter_model.safetensors"))
        assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in weights.items()), stage
    assert results["ppo"]["updates"] == 1 and [p.rsplit("/", 1)[-1] for p in results["ppo"]["start_from"]] == ["sft"]
    assert json.loads((tmp_path / "dpo-checkpoints" / "run_identity.json").read_text())["model"]["load_in_4bit"]

    assert results["grpo"]["updates"] == 1 and results["grpo"]["start_from"] == results["ppo"]["start_from"]
    # merges in fp32 from the original weights: no 4-bit anywhere in the export (of PPO's chain, the longest)
    m = export.run(load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", *FOUR_BIT, "export.stage=ppo"]))
    assert m["stage"] == "ppo" and m["parity_max_abs_diff_fp32"] < 1e-4
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in config
