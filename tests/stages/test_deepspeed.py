"""DeepSpeed ZeRO-2 for real: accelerate launch, 2 CPU processes, the project's own configs."""

import json
import subprocess
import sys

import torch

from tests.conftest import ROOT, subprocess_env


def launch_zero2(stage: str, output_dir, *overrides):
    """`accelerate launch` of a stage script with the project's ZeRO-2 configs on 2 CPU processes."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "recipes/accelerate/deepspeed_zero2_cpu.yaml",
        f"finetune/{stage}.py",
        "recipes/tiny_chat.yaml",
        "deepspeed=deepspeed/zero2.json",
        f"output_dir={output_dir}",
        *overrides,
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def test_zero2_two_processes_trains_adapter_and_keeps_base_bitwise(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.core.modeling import base_fingerprint

    res = launch_zero2("sft", tmp_path, "sft.max_steps=6", "sft.eval_generate_rows=8")
    assert "SFT done" in res.stderr

    out = tmp_path / "sft"
    metrics = json.loads((out / "metrics.json").read_text())
    adapter = out / "adapter_model.safetensors"
    assert adapter.stat().st_size > 10_000  # not the empty adapter of peft#2500
    assert metrics["global_steps"] == 6 and metrics["eval_loss_after"] < metrics["eval_loss_before"]

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert metrics["base_fingerprint"] == base_fingerprint(base) and metrics["base_unchanged"]
    model = PeftModel.from_pretrained(base, out)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 4 * 6 and all(torch.count_nonzero(p) > 0 for p in lora_b.values())
    assert base_fingerprint(model) == metrics["base_fingerprint"]


def test_dpo_under_zero2_two_processes(tmp_path, sft_run):
    """DPO with a PEFT reference (adapters disabled) under ZeRO-2 (trl#2062 failed there before)."""
    import shutil

    _, _, sft_out = sft_run
    shutil.copytree(sft_out, tmp_path / "sft")
    launch_zero2("dpo", tmp_path, "dpo.max_steps=6", "dpo.eval_generate_rows=4")
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    assert metrics["global_steps"] == 6 and metrics["eval_rewards_margin"] > 0 and metrics["base_unchanged"]


def test_reward_model_under_zero2_two_processes(tmp_path, sft_run):
    """The reward stage (sequence-classification head + LoRA) under ZeRO-2: trains, saves its score head."""
    import shutil

    from safetensors.torch import load_file

    _, _, sft_out = sft_run
    shutil.copytree(sft_out, tmp_path / "sft")
    res = launch_zero2("reward", tmp_path, "reward.max_steps=6")
    assert "reward model done" in res.stderr
    metrics = json.loads((tmp_path / "reward" / "metrics.json").read_text())
    assert metrics["global_steps"] == 6 and metrics["base_unchanged"]
    assert metrics["eval_margin"] != metrics["eval_margin_before"]  # the head and adapter moved
    weights = load_file(str(tmp_path / "reward" / "adapter_model.safetensors"))
    assert any("score" in k for k in weights)
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in weights.items())
