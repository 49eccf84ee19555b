"""DRESS REHEARSALS of the shipped Phi recipes: `finetune pipeline` on recipes/phi2_chat.yaml,
phi1_5_chat.yaml and phi3_5_mini_chat.yaml, SFT -> reward -> DPO -> PPO -> GRPO -> export, on CPU.

Only three things are swapped, through command-line overrides: the model (a 2-layer model of the
recipe's own architecture and vocabulary size, random weights, built in tests/phi_models.py), the data
(small copies of ultrachat_200k, ultrafeedback_binarized and gsm8k in their public schema, laid out as their hub
repositories, tests/public_data.py; split and weight stay the recipe's) and the sizes (steps, lengths,
batch), plus what a CPU needs (precision=fp32, no accelerate launcher, no DeepSpeed). The template,
LoRA targets, stage chaining, data formats and export are the recipe's own. Each rehearsal must end
with a merged export that plain transformers loads and that generates. The recipes' last stage, eval
(lm-eval benchmarks), is left out (`pipeline.stages`): its tasks download their data from the hub, and
tests/stages/test_eval.py runs that stage on the offline tiny task.

The three pipelines run side by side (one process each, one thread each), so the imports of their
18 stage processes overlap on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import public_data
from tests.conftest import ROOT, subprocess_env
from tests.phi_models import FAMILIES, write_base

pytestmark = [pytest.mark.rehearsal, pytest.mark.timeout(900)]

RECIPES = {"phi2": "phi2_chat.yaml", "phi1_5": "phi1_5_chat.yaml", "phi3_5": "phi3_5_mini_chat.yaml"}
HUB = {
    "HuggingFaceH4/ultrachat_200k": public_data.ultrachat_folder,
    "HuggingFaceH4/ultrafeedback_binarized": public_data.ultrafeedback_folder,
    "openai/gsm8k": public_data.gsm8k_folder,
}
# The sizes: one or two steps per stage, short sequences, small batches.
SIZES = [
    "training.gradient_accumulation_steps=1",
    "sft.max_steps=2",
    "sft.max_length=128",
    "reward.max_steps=1",
    "reward.max_length=128",
    "dpo.max_steps=1",
    "dpo.max_length=128",
    "ppo.updates=1",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batches=1",
    "ppo.micro_batch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.response_length=8",
    "ppo.max_prompt_length=96",
    "ppo.save_every=1",
    "grpo.updates=1",
    "grpo.rollout_batch_size=2",
    "grpo.num_generations=2",
    "grpo.micro_batch_size=4",
    "grpo.max_completion_length=8",
    "grpo.overlong_buffer=4",
    "grpo.max_prompt_length=96",
    "grpo.save_every=1",
    "samples.count=2",
    "samples.max_new_tokens=8",
]
CPU = ["precision=fp32", "launch.accelerate_config=null", "deepspeed=null"]
TRAINING_STAGES = ["pipeline.stages=[sft, reward, dpo, ppo, grpo, export]"]  # not eval: its benchmarks need the hub


def data_overrides(recipe_file: Path, local: dict[str, Path]) -> list[str]:
    """Each stage's data lists exactly as the recipe ships them, with each hub id replaced by the local copy."""
    raw = yaml.safe_load(recipe_file.read_text())
    out = []
    for stage in ("sft", "reward", "dpo", "ppo", "grpo"):
        for split in ("train", "eval"):
            sources = raw[stage]["data"].get(split) or []
            assert all(s["path"] in local for s in sources), (
                f"{recipe_file.name}: {stage}.data.{split} names other data"
            )
            out.append(f"{stage}.data.{split}={json.dumps([{**s, 'path': str(local[s['path']])} for s in sources])}")
    return out


@pytest.fixture(scope="module")
def rehearsals(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    local = {hub: make(root / "data" / hub.split("/")[1]) for hub, make in HUB.items()}
    texts = [json.dumps(r) for r in public_data.ultrachat_rows(40) + public_data.ultrafeedback_rows(40, offset=1000)]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
    runs, procs = {}, {}
    for family, name in RECIPES.items():
        base = write_base(root / "bases" / family, family, texts)
        out = root / "runs" / family
        cmd = [
            sys.executable,
            "-m",
            "finetune.cli",
            "pipeline",
            str(ROOT / "recipes" / name),
            f"output_dir={out}",
            f"model.name_or_path={base}",
            *CPU,
            *SIZES,
            *TRAINING_STAGES,
            *data_overrides(ROOT / "recipes" / name, local),
        ]
        log = open(root / f"{family}.log", "w")  # noqa: SIM115 (closed below)
        procs[family] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        runs[family] = {"out": out, "base": base, "log": root / f"{family}.log"}
    for family, (proc, log) in procs.items():
        runs[family]["code"] = proc.wait(timeout=850)
        log.close()
    return runs


def check_pipeline(run: dict, family: str) -> None:
    log = run["log"].read_text()
    assert run["code"] == 0, log[-6000:]
    out = run["out"]
    report = json.loads((out / "pipeline_report.json").read_text())
    stages = ("sft", "reward", "dpo", "ppo", "grpo", "export")
    assert [(r["stage"], r["status"]) for r in report["stages"]] == [(s, "ran") for s in stages]
    m = {s: json.loads((out / s / "metrics.json").read_text()) for s in stages}
    # the recipe's chaining: reward and DPO on the SFT model, PPO's policy from DPO and reward from the reward
    # model, GRPO's a new LoRA on the SFT model with the recipe's numeric rule on GSM8K, the export (the last chat
    # stage, GRPO) merging SFT + the GRPO policy
    for stage in ("reward", "dpo"):  # recorded relative to the output, with the absolute path and the content hash
        assert [(r["path"], r["absolute"]) for r in m[stage]["start_from"]] == [("../sft", str(out / "sft"))], stage
    assert m["ppo"]["policy_initialised_from"] == str(out / "dpo") and m["ppo"]["reward_from"] == str(out / "reward")
    from finetune.core.lineage import adapter_chain

    assert adapter_chain(out / "grpo") == [str(out / "sft"), str(out / "grpo")]
    assert m["grpo"]["policy_initialised_from"] is None
    assert m["grpo"]["reward_function"] == "finetune.rl.rewards:numeric_answer" and m["grpo"]["updates"] == 1
    assert m["grpo"]["score_rule_end"] is not None and m["grpo"]["eval_eos_rate_after"] is not None
    assert m["export"]["stage"] == "grpo" and m["export"]["adapters"] == [str(out / "sft"), str(out / "grpo")]
    assert m["sft"]["global_steps"] == 2 and m["dpo"]["global_steps"] == 1 and m["ppo"]["updates"] == 1
    # held-out figures of a real model: pair accuracy, DPO reward accuracy and margin, PPO score / KL / EOS
    for stage, key in (("reward", "eval_accuracy"), ("dpo", "eval_rewards_accuracy"), ("dpo", "eval_rewards_margin")):
        assert isinstance(m[stage][key], float), (stage, key)
    for key in ("score_end", "kl_end", "eos_rate_end", "eval_score_before", "eval_score_after", "eval_eos_rate_after"):
        assert m["ppo"][key] is not None, key
    # the same held-out prompts answered by every chat-model stage, saved beside its metrics
    chat = ("sft", "dpo", "ppo", "grpo", "export")
    samples = {s: [json.loads(x) for x in (out / s / "samples.jsonl").read_text().splitlines()] for s in chat}
    assert [set(r) - {"prompt", "messages"} for r in samples["sft"]] == [{"base", "sft"}] * 2
    assert set(samples["dpo"][0]) - {"prompt", "messages"} == {"start", "dpo"}
    assert set(samples["ppo"][0]) - {"prompt", "messages"} == {"start", "ppo"}
    assert set(samples["grpo"][0]) - {"prompt", "messages"} == {"start", "grpo"}
    assert set(samples["export"][0]) - {"prompt", "messages"} == {"export"}
    assert len({tuple(r["prompt"] for r in rows) for rows in samples.values()}) == 1
    # the recipe's LoRA targets: every linear layer of the family
    targets = set(json.loads((out / "sft" / "adapter_config.json").read_text())["target_modules"])
    family_targets = {"PhiForCausalLM": "phi", "Phi3ForCausalLM": "phi3"}[FAMILIES[family]["cls"]]
    from finetune.core.modeling import LORA_TARGETS

    assert targets == set(LORA_TARGETS[family_targets])


def check_export_generates(run: dict, family: str) -> None:
    """Plain transformers, no finetune code: load the merged folder, render a chat, generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.chat_template import load_template

    folder = run["out"] / "export"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == FAMILIES[family]["cls"]
    assert model.config.vocab_size == FAMILIES[family]["config"]["vocab_size"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: a plain model
    recipe = yaml.safe_load((ROOT / "recipes" / RECIPES[family]).read_text())
    assert tok.chat_template == load_template(recipe["template"]["name"]).source  # the recipe's template, embedded
    eot = load_template(recipe["template"]["name"]).end_of_turn_token(tok)
    eos = model.generation_config.eos_token_id
    assert tok.convert_tokens_to_ids(eot) in (eos if isinstance(eos, list) else [eos])
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]  # it generated


@pytest.mark.parametrize("family", list(RECIPES))
def test_shipped_phi_recipe_runs_every_stage_to_a_merged_export(rehearsals, family):
    run = rehearsals[family]
    check_pipeline(run, family)
    check_export_generates(run, family)
    assert os.path.getsize(run["log"]) > 0
