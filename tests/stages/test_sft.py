"""The SFT stage end to end on the offline default: learning, outputs, CLI forms, resume."""

import json
import re
import subprocess
import sys

import torch

from tests.conftest import ROOT, TINY_RECIPE, subprocess_env


def test_sft_learns_the_task_on_held_out_data(sft_run):
    _, metrics, _ = sft_run
    assert metrics["eval_loss_after"] <= 0.6 * metrics["eval_loss_before"]  # held-out loss down >= 40%
    assert metrics["correct_rate_after"] >= metrics["correct_rate_before"] + 0.4
    assert metrics["train_tokens"] > 0 and metrics["train_runtime_s"] > 0
    assert metrics["base_unchanged"] is True


def test_sft_output_folder_is_complete_and_loads_with_plain_libraries(sft_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.core.modeling import base_fingerprint

    recipe, metrics, out = sft_run
    assert json.loads((out / "metrics.json").read_text())["eval_loss_after"] == metrics["eval_loss_after"]
    assert "name_or_path: builtin:tiny-phi" in (out / "recipe.yaml").read_text()
    assert not list(out.parent.glob(".sft.tmp*"))  # the staging folder was renamed, nothing half-written
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "Instruct: hi\nOutput:"
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    fresh = base_fingerprint(base)
    assert metrics["base_fingerprint"] == fresh  # the trained base is bitwise the file on disk
    model = PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) > 0 for p in lora_b)  # LoRA B starts at zero


def test_trained_model_stops_at_end_of_turn(sft_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = sft_run
    tok = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 4 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(
        **ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id
    )
    new = gen[0, ids["input_ids"].shape[1] :].tolist()
    assert tok.eos_token_id in new and len(new) < 20
    assert tok.decode(new, skip_special_tokens=True).strip() == "7"


def run_cli(*args, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_console_script_and_script_path_with_overrides(tmp_path):
    quick = ["sft.max_steps=3", "sft.eval_generate_rows=4", "sft.save_steps=100"]
    res = run_cli("finetune", "sft", str(TINY_RECIPE), f"output_dir={tmp_path}/a", *quick)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "a/sft/metrics.json").read_text())["global_steps"] == 3
    assert "SFT done" in res.stderr and "eval loss" in res.stderr
    # the script-path form, here with padding-free packing (per-sequence position ids)
    res = run_cli(
        sys.executable,
        "finetune/sft.py",
        "recipes/tiny_chat.yaml",
        f"output_dir={tmp_path}/b",
        "sft.packing=true",
        *quick,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"finetune.sft: packing: \d+ rows into \d+ rows", res.stderr)
    assert (tmp_path / "b/sft/adapter_model.safetensors").is_file()


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    from finetune import sft
    from finetune.recipe import load_recipe

    common = [f"output_dir={tmp_path}", "sft.save_steps=2", "sft.eval_generate_rows=0", "logging.logging_steps=1"]
    sft.run(load_recipe(TINY_RECIPE, common + ["sft.max_steps=4"]))
    assert (tmp_path / "sft-checkpoints" / "checkpoint-4").is_dir()
    metrics = sft.run(load_recipe(TINY_RECIPE, common + ["sft.max_steps=6"]))
    state = json.loads((tmp_path / "sft-checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert metrics["global_steps"] == 6 and metrics["resumed_from"].endswith("checkpoint-4")
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first run's steps 1-4, then 5-6: nothing ran twice


def test_bad_input_exits_2_with_the_message_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    res = run_cli(
        sys.executable,
        "finetune/sft.py",
        "recipes/tiny_chat.yaml",
        f"output_dir={tmp_path}",
        f"sft.data.train=[{{path: {bad}}}]",
    )
    assert res.returncode == 2
    assert f"{bad}: row 1: no assistant message" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(
        sys.executable, "finetune/sft.py", "recipes/tiny_chat.yaml", f"output_dir={tmp_path}", "sft.max_length=null"
    )
    assert res.returncode == 2 and "sft.max_length: must be a number" in res.stderr


def test_gpu_recipe_wiring_without_a_gpu(tmp_path):
    """phi2_chat on this CPU machine: `finetune sft` would relaunch under accelerate with the ZeRO-2
    config, and the stage refuses fp16 without CUDA before loading any model or data."""
    import pytest

    from finetune.core.training import check_precision
    from finetune.launch import stage_command
    from finetune.recipe import RecipeError, load_recipe

    recipe = load_recipe(ROOT / "recipes/phi2_chat.yaml")
    cmd = stage_command(
        "sft",
        "recipes/phi2_chat.yaml",
        ["sft.max_steps=5"],
        recipe.resolve_path(recipe.launch.accelerate_config),
        recipe.launch.num_processes,
    )
    assert cmd[1:5] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate/deepspeed_zero2.yaml"),
    ]
    assert cmd[-3:] == [str(ROOT / "finetune/sft.py"), "recipes/phi2_chat.yaml", "sft.max_steps=5"]
    if torch.cuda.is_available():
        return
    with pytest.raises(RecipeError, match="precision: fp16 training needs a CUDA GPU.*precision=fp32"):
        check_precision(recipe)
    res = run_cli(sys.executable, "finetune/sft.py", "recipes/phi2_chat.yaml", f"output_dir={tmp_path}", timeout=120)
    assert res.returncode == 2 and "fp16 training needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "sft").exists()
