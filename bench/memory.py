"""Measure each stage's peak memory (RSS) on CPU for Phi-2-width models with fewer layers, next to the
estimate finetune.core.memory gives for the same run: the calibration behind docs/memory.md.

    python bench/memory.py --layers 2 4 6 --out bench/results/memory_phi2_cpu.json

Each model is Phi-2's architecture (hidden 2560, 51200 vocabulary, partial rotary 0.4, untied head) with
`--layers` decoder layers and random weights, saved in fp16 as the hub ships Phi-2, with the offline
tiny tokenizer. Every stage of recipes/phi2_chat.yaml runs as a user runs it (`python finetune/<stage>.py
RECIPE overrides`), fp32 on CPU, sequences of at most 128 tokens, under `/usr/bin/time` for its peak RSS.
Full-size Phi-2 (32 layers, 2.78B parameters) needs ~17 GB per stage: run that only on a machine that
has the memory to spare (`--layers 32`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ["sft", "reward", "dpo", "ppo", "export"]
RECIPE = ROOT / "recipes" / "phi2_chat.yaml"


def overrides(out: Path, model: Path) -> list[str]:
    sft = json.dumps([{"path": str(ROOT / "data/tiny/sft_train.jsonl")}])
    sft_eval = json.dumps([{"path": str(ROOT / "data/tiny/sft_eval.jsonl")}])
    pref = json.dumps([{"path": str(ROOT / "data/tiny/pref_train.jsonl")}])
    pref_eval = json.dumps([{"path": str(ROOT / "data/tiny/pref_eval.jsonl")}])
    return [
        f"output_dir={out}",
        f"model.name_or_path={model}",
        "precision=fp32",
        "launch.accelerate_config=null",
        "deepspeed=null",
        "training.gradient_accumulation_steps=1",
        "logging.logging_steps=1",
        f"sft.data.train={sft}",
        f"sft.data.eval={sft_eval}",
        *(f"{s}.data.train={pref}" for s in ("reward", "dpo", "ppo")),
        *(f"{s}.data.eval={pref_eval}" for s in ("reward", "dpo", "ppo")),
        *(f"{s}.data.max_eval_rows=4" for s in ("sft", "reward", "dpo", "ppo")),
        "sft.max_steps=2",  # the peak comes with the first step: more steps only take longer
        "reward.max_steps=1",
        "dpo.max_steps=1",
        *(f"{s}.max_length=128" for s in ("sft", "reward", "dpo")),
        "ppo.updates=1",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batches=1",
        "ppo.micro_batch_size=4",
        "ppo.ppo_epochs=1",
        "ppo.response_length=16",
        "ppo.max_prompt_length=112",
        "ppo.eval_prompts=2",
        "samples.count=1",
        "samples.max_new_tokens=4",
    ]


def build(folder: Path, layers: int) -> int:
    import torch
    from transformers import AutoTokenizer, PhiForCausalLM

    from bench.models import phi2_config
    from finetune.tiny import base_path

    config = phi2_config()
    config.num_hidden_layers = layers
    config.pad_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(base_path())
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = PhiForCausalLM(config).to(torch.float16)  # the hub's Phi-2 is fp16
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    del model
    return params


def measure(stage: str, extra: list[str], env: dict) -> dict:
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB=%M", sys.executable, str(ROOT / "finetune" / f"{stage}.py"), str(RECIPE)]
    if stage == "export":
        extra = [*extra, "export.force=true"]
    started = time.time()
    proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True)
    seconds = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-4000:]}")
    kib = int(re.findall(r"MAXRSS_KB=(\d+)", proc.stderr)[-1])
    return {"peak_rss_gib": kib / 2**20, "seconds": seconds}


def add_estimates(results: dict) -> dict:
    """finetune.core.memory's estimate for each measured run (the same recipe and overrides, the model's
    shape from its config): pure arithmetic, no model is loaded, so it can be redone as the estimator
    changes without measuring again."""
    from finetune.core.memory import estimate_stage, stage_settings
    from finetune.recipe import load_recipe

    for row in results["runs"]:
        shape = phi2_shape(row["layers"])
        recipe = load_recipe(RECIPE, overrides(Path("/tmp/unused"), Path("/tmp/unused")))
        for stage, figures in row["stages"].items():
            figures["estimate_gib"] = round(
                estimate_stage(stage, shape, stage_settings(recipe, stage, "cpu", 1)).total_gib, 2
            )
    return results


def phi2_shape(layers: int):
    from bench.models import phi2_config
    from finetune.core.memory import shape_from_config

    config = phi2_config()
    config.num_hidden_layers = layers
    config.dtype = "float16"  # as build() saves it
    return shape_from_config(config, ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], 16)


def gpu_table() -> str:
    """The GPU estimates of docs/memory.md: each Phi recipe as shipped, 8 processes (one per GPU)."""
    from finetune.core.memory import GIB, estimate_stage, model_shape, stage_settings
    from finetune.recipe import STAGES as REGISTRY
    from finetune.recipe import load_recipe

    lines = [
        "| recipe | stage | per GPU (GiB) | largest parts (GiB) | host RAM per process while loading (GiB) |",
        "|---|---|---|---|---|",
    ]
    for name in ("phi2_chat", "phi1_5_chat", "phi3_5_mini_chat"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        shape, _ = model_shape(recipe)
        for stage in recipe.pipeline_stages():  # the stages the recipe runs, as the registry lists them
            processes = 8 if REGISTRY[stage].launcher else 1  # export and eval run once
            est = estimate_stage(stage, shape, stage_settings(recipe, stage, "cuda", processes))
            where = f"{est.total_gib:.1f}" if est.device == "cuda" else f"CPU: {est.total_gib:.1f} of RAM"
            host = f"{est.host_gib:.1f}" if est.device == "cuda" else "-"
            parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in est.parts.items() if v >= 0.5 * GIB)
            lines.append(f"| {name} | {stage} | {where} | {parts} | {host} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_phi2_cpu.json")
    parser.add_argument("--estimates-only", action="store_true", help="only (re)compute the estimates in --out")
    parser.add_argument("--gpu-table", action="store_true", help="print the GPU estimate table of docs/memory.md")
    args = parser.parse_args()
    if args.gpu_table:
        print(gpu_table())
        return
    if args.estimates_only:
        args.out.write_text(json.dumps(add_estimates(json.loads(args.out.read_text())), indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env["FINETUNE_MEMORY_CHECK"] = "off"  # measure, do not refuse
    results = {
        "what": "peak RSS per stage, Phi-2 width with fewer layers, fp32 on CPU, seq <= 128 (bench/memory.py)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="finetune-memory-") as tmp:
        for layers in args.layers:
            model = Path(tmp) / f"phi2-{layers}l"
            params = build(model, layers)
            extra = overrides(Path(tmp) / f"run-{layers}l", model)
            row = {"layers": layers, "parameters": params, "stages": {}}
            for stage in STAGES:
                row["stages"][stage] = measure(stage, extra, env)
                print(f"{layers} layers ({params / 1e9:.2f}B) {stage}: {row['stages'][stage]}", flush=True)
            results["runs"].append(row)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.write_text(json.dumps(add_estimates(results), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
