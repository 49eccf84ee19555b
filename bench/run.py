"""Benchmark a stage against a plain baseline: real (non-padding) tokens/s, peak memory, PPO time split.

    python bench/run.py --stage sft --model tiny [--steps 8] [--repeats 3] [--out sft.json]
    python bench/run.py --stage ppo --model phi2 --out ppo_phi2.json        # GPU: Phi-2 architecture, fp16
    python bench/run.py --stage dpo --model tiny --baseline                  # the baseline alone

Arms: `ours` (the stage's own training path: finetune.sft / finetune.dpo / finetune.rl with its
defaults) and `baseline` (bench/*_baseline.py: plain TRL with the same model, LoRA, batch, length and
data; for PPO our engine with its speed switches off). Extra arms isolate one optimisation
(`--arms ours,baseline,ours-nopack`, see ARMS). Each run of an arm is a fresh process (clean peak
memory, no warm caches shared between arms); arms alternate order across repeats so slow spells on
a shared machine hit both; the median of the repeats is reported. Every run does `--warmup` steps
first, then times `--steps` steps. Timings are never asserted anywhere: this script measures them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = {
    "sft": {
        "ours": "finetune SFT defaults (padding-free packing)",
        "baseline": "TRL SFTTrainer defaults (padded)",
        "ours-nopack": "finetune SFT with sft.packing=false",
    },
    "dpo": {
        "ours": "finetune DPO defaults",
        "baseline": "TRL DPOTrainer defaults",
        "ours-precompute": "finetune DPO with precompute_ref_log_probs=true",
    },
    "ppo": {
        "ours": "finetune PPO engine defaults",
        "baseline": "same engine, speed switches off "
        "(no KV cache, one prompt per generate, full-vocab logits everywhere)",
        "no-kv-cache": "defaults but generation without KV cache",
        "unbatched": "defaults but one prompt per generate() call",
        "full-logits": "defaults but vocab-sized logits at every position",
    },
}


# ----------------------------------------------------------------------------- one run (child process)


def _recipe(model: str, stage: str, out: str, steps: int, extra: list[str]):
    from bench.models import SETTINGS
    from finetune.recipe import apply_overrides, validate_recipe

    s = SETTINGS[model]
    raw = {
        "output_dir": out,
        "seed": 42,
        "precision": s["precision"],
        "model": {"name_or_path": "builtin:tiny-phi", "attn_implementation": "auto"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "logging": {"logging_steps": 10_000},
        "training": {
            "per_device_train_batch_size": s["batch"],
            "max_steps": steps,
            "learning_rate": 1e-4,
            "save_strategy": "no",
            "disable_tqdm": True,
        },
        stage: {"data": {"train": [{"path": "generated-by-bench"}]}},
    }
    if stage in ("sft", "dpo"):
        raw[stage]["max_length"] = s["max_length"]
    if stage == "ppo":
        raw["training"] = {}
        raw["ppo"].update(
            rollout_batch_size=s["ppo_batch"],
            micro_batch_size=s["ppo_batch"],
            mini_batches=1,
            ppo_epochs=1,
            response_length=s["response_length"],
            temperature=1.0,
        )
    return validate_recipe(apply_overrides(raw, extra), source="bench")


class _Meter:
    """Real tokens of each collated batch (counted from the unpadded examples) and step end times."""

    def __init__(self, count):
        from transformers import TrainerCallback

        self.count, self.tokens, self.times = count, [], []
        meter = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.times.append(time.perf_counter())

        self.callback = Callback()

    def wrap(self, collator):
        def collate(examples):
            self.tokens.append(sum(self.count(e) for e in examples))
            return collator(examples)

        return collate

    def figures(self, warmup: int) -> dict:
        # step k's batch is the k-th collated one; the window runs from the end of the last warm-up step
        measured = self.tokens[warmup : len(self.times)]
        seconds = self.times[-1] - self.times[warmup - 1]
        return {
            "tokens_per_s": sum(measured) / seconds,
            "seconds_per_step": seconds / len(measured),
            "tokens_per_step": sum(measured) / len(measured),
            "measured_steps": len(measured),
        }


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _trainer_run(stage: str, arm: str, model_name: str, steps: int, warmup: int, out: str) -> dict:
    """SFT / DPO: build the arm's trainer on the same rows, train warmup + steps, measure."""
    from bench import dpo_baseline, sft_baseline
    from bench.data import chat_rows, preference_rows
    from bench.models import SETTINGS, build_model
    from finetune.core.data import DataReport, tokenize_conversations, tokenize_preferences
    from finetune.core.modeling import add_lora, load_tokenizer, template_for

    s = SETTINGS[model_name]
    extra = {"ours-nopack": ["sft.packing=false"], "ours-precompute": ["dpo.precompute_ref_log_probs=true"]}
    recipe = _recipe(model_name, stage, out, warmup + steps, extra.get(arm, []))
    tokenizer, template = load_tokenizer(recipe), template_for(recipe)
    model = build_model(model_name, recipe)
    if stage == "sft":
        rows = chat_rows(tokenizer, s["rows"], s["max_length"])
        count = lambda e: len(e["input_ids"])  # noqa: E731  (unpadded row or pack)
    else:
        rows = preference_rows(tokenizer, s["rows"], s["max_length"])
        count = lambda e: 2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])  # noqa: E731
    meter = _Meter(count)
    started = time.perf_counter()
    precompute = {}
    if arm == "baseline":
        maker = sft_baseline if stage == "sft" else dpo_baseline
        trainer = maker.make_trainer(
            model,
            tokenizer,
            rows,
            s["batch"],
            s["max_length"],
            warmup + steps,
            s["precision"],
            out,
            callbacks=[meter.callback],
        )
    elif stage == "sft":
        from finetune.sft import make_trainer, sft_args

        args = sft_args(recipe)
        ds = tokenize_conversations(rows, tokenizer, template, args.max_length, "drop", DataReport(), "train")
        trainer = make_trainer(recipe, args, add_lora(model, recipe), tokenizer, ds, callbacks=[meter.callback])
    else:
        from trl import DPOConfig, DPOTrainer

        from finetune.core.training import trl_config
        from finetune.dpo import make_trainer

        args = trl_config(recipe, "dpo", DPOConfig, eval_strategy="no")
        pairs = tokenize_preferences(rows, tokenizer, template, args.max_length, "drop", DataReport(), "train")
        cls = DPOTrainer  # time the one-off reference pass (it runs inside the trainer's constructor)
        inner = cls._precompute_ref_logps

        def timed(self, *a, **k):
            t = time.perf_counter()
            result = inner(self, *a, **k)
            precompute["precompute_ref_s"] = time.perf_counter() - t
            return result

        cls._precompute_ref_logps = timed
        trainer = make_trainer(args, add_lora(model, recipe), tokenizer, pairs, callbacks=[meter.callback])
    setup_s = time.perf_counter() - started
    trainer.data_collator = meter.wrap(trainer.data_collator)
    trainer.train()
    figures = meter.figures(warmup)
    if stage == "dpo":  # tokens of one pass over the data, to amortise a one-off reference pass
        ds = trainer.train_dataset
        figures["dataset_tokens"] = sum(
            2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
        )
    return {
        **figures,
        **precompute,
        "setup_s": setup_s,
        "peak_memory_mb": _peak_memory_mb(),
        "attention": model.config._attn_implementation,
    }


def _ppo_run(arm: str, model_name: str, steps: int, warmup: int, out: str) -> dict:
    """PPO: our engine on a fresh policy LoRA; the score is a reward-model-sized forward (the base
    with adapters off, a fixed random head at the last real token), so scoring costs what it would."""
    import torch
    from peft import LoraConfig, TaskType

    from bench.data import prompt_rows
    from bench.models import SETTINGS, build_model
    from finetune.chat_template import end_of_turn_ids, tokenize_prompt
    from finetune.core.batching import left_pad
    from finetune.core.modeling import load_tokenizer, lora_targets, template_for
    from finetune.rl.engine import REFERENCE, PPOEngine, SpeedSwitches
    from finetune.rl.engine import build_model as build_multi
    from finetune.rl.functional import reward_readout_index

    s = SETTINGS[model_name]
    recipe = _recipe(model_name, "ppo", out, 0, [])
    tokenizer, template = load_tokenizer(recipe), template_for(recipe)
    torch.manual_seed(0)
    base = build_model(model_name, recipe)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type=TaskType.CAUSAL_LM,
        target_modules=lora_targets(recipe, base.config.model_type),
    )
    model = build_multi(base, config, value_init="new")
    head = torch.nn.Linear(base.config.hidden_size, 1).to(next(base.parameters()).device)
    pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(ids, mask, prompt_width, responses, resp_mask, has_stop, rows=None):
        index = reward_readout_index(ids, mask, pad_id)
        with model.active(REFERENCE):
            h = model.hidden(ids, mask)
        return head(h[torch.arange(len(ids), device=ids.device), index].float())[..., 0], {}

    off = {
        "baseline": dict(generate_use_cache=False, generation_batch_size=1, response_only_logits=False),
        "no-kv-cache": dict(generate_use_cache=False),
        "unbatched": dict(generation_batch_size=1),
        "full-logits": dict(response_only_logits=False),
    }.get(arm, {})
    engine = PPOEngine(
        model,
        recipe.ppo,
        score,
        end_of_turn_ids(tokenizer, template),
        pad_id,
        seed=42,
        fp16=recipe.precision == "fp16",
        switches=SpeedSwitches(**off),
    )
    prompts = [
        tokenize_prompt(tokenizer, r["prompt"])
        for r in prompt_rows(tokenizer, s["ppo_batch"] * (warmup + steps), s["max_prompt_length"])
    ]
    device = engine.device
    runs = []
    for k in range(warmup + steps):
        ids, mask = left_pad(prompts[k * s["ppo_batch"] : (k + 1) * s["ppo_batch"]], pad_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = engine.step(ids.to(device), mask.to(device))
        stats["update_s"] = time.perf_counter() - t
        ro = engine.last_rollout
        stats["real_tokens"] = int(ro.mask.sum())
        stats["response_tokens"] = int(ro.resp_mask.sum())
        runs.append(stats)
    measured = runs[warmup:]

    def total(key):
        return sum(r[key] for r in measured)

    return {
        "tokens_per_s": total("real_tokens") / total("update_s"),
        "seconds_per_update": total("update_s") / len(measured),
        "time_generate_s": total("time_generate_s") / len(measured),
        "time_score_s": total("time_score_s") / len(measured),
        "time_optimise_s": total("time_optimise_s") / len(measured),
        "generated_tokens_per_s": total("response_tokens") / total("time_generate_s"),
        "generation_share": total("time_generate_s") / total("update_s"),
        "response_length": total("response_tokens") / (len(measured) * s["ppo_batch"]),
        "measured_steps": len(measured),
        "peak_memory_mb": _peak_memory_mb(),
        "attention": base.config._attn_implementation,
    }


def worker(stage: str, arm: str, model: str, steps: int, warmup: int) -> dict:
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        if stage == "ppo":
            return _ppo_run(arm, model, steps, warmup, out)
        return _trainer_run(stage, arm, model, steps, warmup, out)


# ----------------------------------------------------------------------------- the invocation


def _machine() -> dict:
    import torch
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _load() -> float:
    return os.getloadavg()[0]


def _child(stage, arm, model, steps, warmup) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        arm,
        "--stage",
        stage,
        "--model",
        model,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"bench: {arm} run failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["sft", "dpo", "ppo"], required=True)
    p.add_argument(
        "--model",
        choices=["tiny", "phi2", "phi2-small"],
        default="tiny",
        help="tiny: builtin:tiny-phi (CPU); phi2: Phi-2 architecture, random weights, fp16 (GPU); "
        "phi2-small: the same shape rules at CPU size (a check of the phi2 path)",
    )
    p.add_argument("--baseline", action="store_true", help="run the baseline arm only")
    p.add_argument(
        "--arms",
        help="comma-separated arms (default ours,baseline); one of: "
        + "; ".join(f"{st}: {', '.join(a)}" for st, a in ARMS.items()),
    )
    p.add_argument("--steps", type=int, default=8, help="measured steps (PPO: updates) per run")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing starts")
    p.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating arm order")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (timing starts at the end of a warm-up step)")
    if args.worker:
        print(json.dumps(worker(args.stage, args.worker, args.model, args.steps, args.warmup)))
        return 0
    arms = ["baseline"] if args.baseline else (args.arms.split(",") if args.arms else ["ours", "baseline"])
    unknown = [a for a in arms if a not in ARMS[args.stage]]
    if unknown:
        p.error(f"unknown arm(s) {unknown} for {args.stage}; choose from {list(ARMS[args.stage])}")
    load_before = _load()
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.repeats):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            result = _child(args.stage, arm, args.model, args.steps, args.warmup)
            result["load_average_1m"] = _load()
            runs[arm].append(result)
            print(f"  run {r + 1}/{args.repeats} {arm:<16} {result['tokens_per_s']:10.1f} tokens/s", file=sys.stderr)
    report = {
        "stage": args.stage,
        "model": args.model,
        "date": datetime.date.today().isoformat(),
        "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _machine(),
        "load_average_1m_before": load_before,
        "load_average_1m_after": _load(),
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "arms": {a: {"what": ARMS[args.stage][a], "median": _median(runs[a]), "runs": runs[a]} for a in arms},
    }
    if args.stage == "dpo":
        for a in arms:  # a run of the recipe's length (tiny: 4 epochs) pays a precompute pass once
            m, epochs = report["arms"][a]["median"], 4
            work = epochs * m["dataset_tokens"]
            m["tokens_per_s_4_epochs"] = work / (m.get("precompute_ref_s", 0.0) + work / m["tokens_per_s"])
    if "ours" in arms and "baseline" in arms:
        ours, base = report["arms"]["ours"]["median"], report["arms"]["baseline"]["median"]
        report["ratio_tokens_per_s"] = ours["tokens_per_s"] / base["tokens_per_s"]
        report["ratio_peak_memory"] = ours["peak_memory_mb"] / base["peak_memory_mb"]
    print(
        f"\n{args.stage} on {args.model} ({report['machine'].get('gpu', report['machine'].get('cpu_model', ''))}), "
        f"median of {args.repeats}, load {load_before:.2f} -> {report['load_average_1m_after']:.2f}"
    )
    for a in arms:
        m = report["arms"][a]["median"]
        line = f"  {a:<16} {m['tokens_per_s']:10.1f} real tokens/s  peak {m['peak_memory_mb']:8.0f} MB"
        if args.stage == "ppo":
            line += (
                f"  {m['seconds_per_update']:.2f} s/update = generate {m['time_generate_s']:.2f} + score "
                f"{m['time_score_s']:.2f} + optimise {m['time_optimise_s']:.2f}"
            )
        if args.stage == "dpo":
            line += f"  ({m['tokens_per_s_4_epochs']:.1f} tokens/s over 4 epochs incl. any precompute)"
        print(line)
    if "ratio_tokens_per_s" in report:
        print(
            f"  ratio ours/baseline: {report['ratio_tokens_per_s']:.2f}x tokens/s, "
            f"{report['ratio_peak_memory']:.2f}x peak memory"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
