"""Benchmark a stage against its peers: real (non-padding) tokens/s, peak memory, PPO time split.

    python bench/run.py --stage sft --model tiny --arms ours,trl-tuned [--steps 8] [--repeats 3] [--out sft.json]
    python bench/run.py --stage ppo --model tiny --arms ours,peer        # needs bash bench/peer_env.sh once
    python bench/run.py --stage dpo --model phi2-width                  # CPU: Phi-2's width, 2 layers
    python bench/run.py --stage reward --model phi2-width --arms ours,trl-tuned,ours-padded
    python bench/run.py --stage ppo --model phi2 --out ppo_phi2.json     # GPU: Phi-2 architecture, fp16
    python bench/run.py --stage grpo --model tiny --arms ours,trl        # ours vs TRL 1.16's GRPOTrainer

Arms (ARMS below; the first arm is compared with every other): `ours` is the stage's own training path
(finetune's SFT / DPO stage code with its defaults, our PPO engine); `trl-tuned` is TRL 1.16 with
everything it offers for the job switched on (bench/sft_baseline.py, bench/dpo_baseline.py,
bench/reward_baseline.py);
`baseline` is TRL with its defaults, as most scripts run it; `peer` is TRL 1.12's PPOTrainer, the last
TRL PPO, run by bench/ppo_peer.py in its own virtual environment on a plain Hugging Face export of
the same model and prompts; for GRPO `trl` is TRL 1.16's GRPOTrainer with LoRA and a reward model passed as a
separate model, as its documentation shows (bench/grpo_trl.py). Other arms switch one optimisation off.
For SFT and DPO, `+liger` after `ours` or `trl-tuned` adds `use_liger_kernel=True` (GPU only).

Each run of an arm is a fresh process (clean peak memory, no warm caches shared between arms); arms
alternate order across repeats so slow spells on a shared machine hit both; the median of the repeats
is reported. Every run does `--warmup` steps first, then times `--steps` steps. PPO rollouts always
run the full response length (the stop id is one the model cannot sample), so every arm generates
the same number of tokens. Timings are never asserted anywhere: this script measures them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEER_VENV = Path(os.environ.get("FINETUNE_BENCH_PEER_VENV", Path.home() / ".cache" / "finetune-bench" / "trl112-venv"))

ARMS = {
    "sft": {
        "ours": "finetune SFT defaults (padding-free packs, one row each; no gradient checkpointing)",
        "trl-tuned": "TRL 1.16 SFTTrainer tuned: packing bfd (padding-free), no gradient checkpointing, "
        "same attention kernel",
        "trl-tuned-nopack": "TRL 1.16 SFTTrainer tuned but padded batches (no packing)",
        "baseline": "TRL SFTTrainer defaults (padded, gradient checkpointing)",
        "ours-nopack": "finetune SFT with sft.packing=false",
    },
    "dpo": {
        "ours": "finetune DPO defaults",
        "trl-tuned": "TRL 1.16 DPOTrainer tuned: precomputed reference log-probs, no gradient checkpointing, "
        "same attention kernel",
        "baseline": "TRL DPOTrainer defaults (reference every step, gradient checkpointing)",
        "ours-precompute": "finetune DPO with dpo.precompute_ref_log_probs=true (the default on one process)",
        "ours-noprecompute": "finetune DPO with dpo.precompute_ref_log_probs=false (the reference in every step)",
        "ours-padded": "finetune DPO with dpo.padding_free=false (TRL's padded batches)",
    },
    "reward": {
        "ours": "finetune reward defaults (padding-free pairs; no gradient checkpointing)",
        "trl-tuned": "TRL 1.16 RewardTrainer tuned: no gradient checkpointing, same attention kernel "
        "(it has no padding-free option)",
        "baseline": "TRL RewardTrainer defaults (padded, gradient checkpointing)",
        "ours-padded": "finetune reward with reward.padding_free=false (TRL's padded batches)",
    },
    "ppo": {
        "ours": "finetune PPO engine defaults (one base, policy/value LoRA, reward read from the base)",
        "peer": "TRL 1.12.0 PPOTrainer (last TRL PPO): LoRA policy, full value and reward models",
        "baseline": "same engine, speed switches off (no KV cache, one prompt per generate, full-vocab logits)",
        "no-kv-cache": "defaults but generation without KV cache",
        "unbatched": "defaults but one prompt per generate() call",
        "full-logits": "defaults but vocab-sized logits at every position",
    },
    "grpo": {
        "ours": "finetune GRPO engine (one base: policy LoRA, the reward model as a LoRA adapter + head on it)",
        "trl": "TRL 1.16 GRPOTrainer: LoRA policy (peft_config), the reward model passed as a separate model",
        "ours-vllm": "finetune GRPO engine with vLLM rollouts (use_vllm; CUDA and a matching vLLM only)",
    },
}
LIGER_ARMS = ("ours", "trl-tuned")  # SFT / DPO arms that take a "+liger" suffix


def known_arm(stage: str, arm: str) -> bool:
    base, _, suffix = arm.partition("+")
    liger = suffix == "liger" and stage in ("sft", "dpo") and base in LIGER_ARMS
    return base in ARMS[stage] and (not suffix or liger)


def describe(stage: str, arm: str) -> str:
    base, _, suffix = arm.partition("+")
    return ARMS[stage][base] + (", use_liger_kernel=True" if suffix else "")


# ----------------------------------------------------------------------------- one run (child process)


def _recipe(model: str, stage: str, out: str, steps: int, extra: list[str]):
    from bench.models import SETTINGS
    from bench.ours import apply_overrides, validate_recipe

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
    if stage in ("sft", "dpo", "reward"):
        raw[stage]["max_length"] = s["max_length"]
    if stage == "ppo":
        raw["training"] = {}
        raw["ppo"].update(
            rollout_batch_size=s["ppo_batch"],
            micro_batch_size=s["ppo_micro_batch"],
            mini_batches=1,
            ppo_epochs=s["ppo_epochs"],
            response_length=s["response_length"],
            temperature=1.0,
        )
    return validate_recipe(apply_overrides(raw, extra), source="bench")


class _Meter:
    """Real tokens of each collated batch (counted from the unpadded examples), step end times and the
    process's CPU time at each step end (all threads: on a shared machine, tokens per CPU-second moves far
    less with other people's load than tokens per wall-second does). `watch(model)` also counts the positions
    the model's forwards compute in the measured steps (padding included: the work a padded batch pays for; a
    reference forward and gradient checkpointing's second forward count too).
    With FINETUNE_BENCH_PROFILE=1 (`--profile`) the measured steps run under torch.profiler and the figures
    carry where their CPU time went, by kind of op."""

    def __init__(self, count, warmup: int):
        from transformers import TrainerCallback

        self.count, self.warmup, self.tokens, self.times, self.cpu = count, warmup, [], [], []
        self.positions = 0  # positions computed by the forwards of the measured steps
        self.profiler = None
        profile = os.environ.get("FINETUNE_BENCH_PROFILE") == "1"
        meter = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                meter.times.append(time.perf_counter())
                meter.cpu.append(time.process_time())
                if profile and len(meter.times) == meter.warmup:
                    import torch

                    meter.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    meter.profiler.__enter__()

        self.callback = Callback()

    def measuring(self) -> bool:
        return len(self.times) >= self.warmup

    def watch(self, model) -> None:
        def count(module, args):
            if self.measuring():
                self.positions += args[0].numel()

        model.get_input_embeddings().register_forward_pre_hook(count)

    def wrap(self, collator):
        def collate(examples):
            self.tokens.append(sum(self.count(e) for e in examples))
            return collator(examples)

        return collate

    def figures(self, warmup: int) -> dict:
        # step k's batch is the k-th collated one; the window runs from the end of the last warm-up step
        measured = self.tokens[warmup : len(self.times)]
        seconds = self.times[-1] - self.times[warmup - 1]
        cpu = self.cpu[-1] - self.cpu[warmup - 1]
        out = {
            "tokens_per_s": sum(measured) / seconds,
            "seconds_per_step": seconds / len(measured),
            "tokens_per_cpu_s": sum(measured) / cpu,
            "tokens_per_step": sum(measured) / len(measured),
            "measured_steps": len(measured),
        }
        if self.positions:
            out["forward_positions_per_step"] = self.positions / len(measured)
            out["forward_positions_per_real_token"] = self.positions / sum(measured)
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            out["profile"] = profile_summary(self.profiler, len(measured))
        return out


# op kinds for profile_summary: where a step's CPU time goes
OP_KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "attention")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy", "logsigmoid", "log_sigmoid")),
    ("optimizer", ("adam", "_foreach")),
    (
        "copies and indexing",
        (
            "copy_",
            "aten::cat",
            "index",
            "embedding",
            "fill_",
            "zero_",
            "clone",
            "_to_copy",
            "pad",
            "gather",
            "scatter",
            "masked_fill",
            "aten::where",
            "aten::stack",
            "aten::empty",
        ),
    ),
)


def op_kind(name: str) -> str:
    low = name.lower()
    for kind, marks in OP_KINDS:
        if any(low in (m, m + "_") or (not m.startswith("aten::") and m in low) for m in marks):  # addmm_: in place
            return kind
    return "elementwise and other"


def profile_summary(profiler, steps: int) -> dict:
    """Self CPU time per measured step, its share by kind of op, and the ten ops that took the most."""
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1
    kinds: dict[str, float] = {}
    for e in events:
        kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + e.self_cpu_time_total / total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "self_cpu_s_per_step": total / 1e6 / steps,
        "share_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top_ops": [
            {"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in top
        ],
    }


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _real_tokens(example: dict) -> int:
    """Real tokens of one collated example: a row or pack (SFT), a pair's two sequences (DPO: the prompt
    twice; reward: full sequences)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return 2 * len(example.get("prompt_ids", ())) + len(example["chosen_ids"]) + len(example["rejected_ids"])


def _trainer_run(
    stage: str, arm: str, model_name: str, steps: int, warmup: int, out: str, rows: int | None = None
) -> dict:
    """SFT / DPO / reward: build the arm's trainer on the same rows, train warmup + steps, measure."""
    import torch

    from bench import dpo_baseline, reward_baseline, sft_baseline
    from bench import ours as fo
    from bench.data import chat_rows, preference_rows
    from bench.models import SETTINGS, build_model

    s = SETTINGS[model_name]
    n_rows = rows or s["rows"]
    base_arm, _, suffix = arm.partition("+")
    liger = suffix == "liger"
    extra = {
        "ours-nopack": ["sft.packing=false"],
        "ours-precompute": ["dpo.precompute_ref_log_probs=true"],
        "ours-noprecompute": ["dpo.precompute_ref_log_probs=false"],
        "ours-padded": [f"{stage}.padding_free=false"],
    }
    overrides = extra.get(base_arm, []) + (["training.use_liger_kernel=true"] if liger else [])
    recipe = _recipe(model_name, stage, out, warmup + steps, overrides)
    tokenizer, template = fo.load_tokenizer(recipe), fo.template_for(recipe)
    model = build_model(model_name, recipe, task="seq_cls" if stage == "reward" else "causal_lm")
    if stage == "sft":
        rows = chat_rows(tokenizer, n_rows, s["max_length"])
    else:
        rows = preference_rows(tokenizer, n_rows, s["max_length"])
    meter = _Meter(_real_tokens, warmup)
    meter.watch(model)
    started = time.perf_counter()
    precompute = {}
    if stage == "dpo":  # time the one-off reference pass (it runs inside the trainer's constructor)
        from trl import DPOTrainer

        inner = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):
            _sync()
            t = time.perf_counter()
            result = inner(self, *a, **k)
            _sync()
            precompute["precompute_ref_s"] = precompute.get("precompute_ref_s", 0.0) + time.perf_counter() - t
            return result

        DPOTrainer._precompute_ref_logps = timed
    if base_arm in ("baseline", "trl-tuned", "trl-tuned-nopack"):
        maker = {"sft": sft_baseline, "dpo": dpo_baseline, "reward": reward_baseline}[stage]
        tuned = {"baseline": False, "trl-tuned": True, "trl-tuned-nopack": "nopack"}[base_arm]
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
            tuned=tuned,
            liger=liger,
        )
    elif stage == "sft":
        args = fo.sft_args(recipe)
        ds = fo.tokenize_conversations(rows, tokenizer, template, args.max_length, "drop", fo.DataReport(), "train")
        trainer = fo.sft_trainer(recipe, args, fo.add_lora(model, recipe), tokenizer, ds, callbacks=[meter.callback])
    elif stage == "reward":
        from trl import RewardConfig

        args = fo.trl_config(recipe, "reward", RewardConfig, eval_strategy="no")
        pairs = fo.tokenize_preferences(rows, tokenizer, template, args.max_length, "drop", fo.DataReport(), "train")
        trainer = fo.reward_trainer(
            args,
            fo.add_lora(model, recipe, task="seq_cls"),
            tokenizer,
            fo.as_reward_rows(pairs),
            padding_free=recipe.reward.padding_free,
            callbacks=[meter.callback],
        )
    else:
        from trl import DPOConfig

        args = fo.trl_config(recipe, "dpo", DPOConfig, eval_strategy="no")  # with the stage's registry defaults
        pairs = fo.tokenize_preferences(rows, tokenizer, template, args.max_length, "drop", fo.DataReport(), "train")
        trainer = fo.dpo_trainer(args, fo.add_lora(model, recipe), tokenizer, pairs, callbacks=[meter.callback])
    setup_s = time.perf_counter() - started
    if stage == "dpo":
        DPOTrainer._precompute_ref_logps = inner
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
        "liger": liger,
        "padding_free_pairs": bool(getattr(trainer, "_pack_batches", False)),  # DPO / reward: ours packs pairs
        "torch_threads": torch.get_num_threads(),
    }


def _ppo_rows(tokenizer, model_name: str, n: int) -> list[dict]:
    from bench.data import prompt_rows
    from bench.models import SETTINGS

    return prompt_rows(tokenizer, n, SETTINGS[model_name]["max_prompt_length"])


def _ppo_prompts(tokenizer, model_name: str, n: int) -> list[list[int]]:
    """The rendered, tokenized PPO prompts (chat template, generation prompt) both PPO arms use."""
    from bench import ours as fo

    return [fo.tokenize_prompt(tokenizer, r["prompt"]) for r in _ppo_rows(tokenizer, model_name, n)]


def _ppo_run(arm: str, model_name: str, steps: int, warmup: int, out: str) -> dict:
    """PPO: our engine on a fresh policy LoRA; the score is a reward-model-sized forward (the base
    with adapters off, a fixed random head at the last real token), so scoring costs what it would."""
    import torch
    from peft import LoraConfig, TaskType

    from bench import ours as fo
    from bench.models import SETTINGS, build_model

    s = SETTINGS[model_name]
    recipe = _recipe(model_name, "ppo", out, 0, [])
    tokenizer = fo.load_tokenizer(recipe)
    torch.manual_seed(0)
    base = build_model(model_name, recipe)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type=TaskType.CAUSAL_LM,
        target_modules=fo.lora_targets(recipe, base.config.model_type),
    )
    model = fo.build_multi_adapter(base, config, value_init="new")
    head = torch.nn.Linear(base.config.hidden_size, 1).to(next(base.parameters()).device)
    pad_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(ids, mask, prompt_width, responses, resp_mask, has_stop, rows=None):
        index = fo.reward_readout_index(ids, mask, pad_id)
        with model.active(fo.REFERENCE):
            h = model.hidden(ids, mask)
        return head(h[torch.arange(len(ids), device=ids.device), index].float())[..., 0], {}

    off = {
        "baseline": dict(generate_use_cache=False, generation_batch_size=1, response_only_logits=False),
        "no-kv-cache": dict(generate_use_cache=False),
        "unbatched": dict(generation_batch_size=1),
        "full-logits": dict(response_only_logits=False),
    }.get(arm, {})
    # Every rollout runs the full response length, as TRL's PPOTrainer does without a stop token: the stop
    # id is the vocabulary size, an id the model cannot sample. Same tokens generated in every arm.
    never = [base.config.vocab_size]
    engine = fo.PPOEngine(
        model,
        recipe.ppo,
        score,
        never,
        pad_id,
        seed=42,
        fp16=recipe.precision == "fp16",
        switches=fo.SpeedSwitches(**off),
    )
    prompts = _ppo_prompts(tokenizer, model_name, s["ppo_batch"] * (warmup + steps))
    device = engine.device
    held = {id(p): p.numel() for p in model.parameters()}
    held.update({id(p): p.numel() for p in head.parameters()})
    runs = []
    for k in range(warmup + steps):
        ids, mask = fo.left_pad(prompts[k * s["ppo_batch"] : (k + 1) * s["ppo_batch"]], pad_id)
        _sync()
        t, c = time.perf_counter(), time.process_time()
        stats = engine.step(ids.to(device), mask.to(device))
        _sync()
        stats["update_s"], stats["update_cpu_s"] = time.perf_counter() - t, time.process_time() - c
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
        "tokens_per_cpu_s": total("real_tokens") / total("update_cpu_s"),
        "cpu_seconds_per_update": total("update_cpu_s") / len(measured),
        "time_generate_s": total("time_generate_s") / len(measured),
        "time_score_s": total("time_score_s") / len(measured),
        "time_optimise_s": total("time_optimise_s") / len(measured),
        "generated_tokens_per_s": total("response_tokens") / total("time_generate_s"),
        "generation_share": total("time_generate_s") / total("update_s"),
        "response_length": total("response_tokens") / (len(measured) * s["ppo_batch"]),
        "measured_steps": len(measured),
        "peak_memory_mb": _peak_memory_mb(),
        "parameters_held": sum(held.values()),
        "attention": base.config._attn_implementation,
    }


def _reward_model(model_name: str, recipe, base):
    """A reward model of the benchmark model's architecture with the base's weights and a random score head (a
    reward-model-sized forward is what scoring costs; its values do not matter for speed)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = base.config.__class__.from_dict({**base.config.to_dict(), "num_labels": 1})
    config.pad_token_id = base.config.pad_token_id if base.config.pad_token_id is not None else base.config.eos_token_id
    torch.manual_seed(1)
    seq = AutoModelForSequenceClassification.from_config(config, dtype=next(base.parameters()).dtype)
    seq.load_state_dict(base.state_dict(), strict=False)  # everything but the LM head / score head
    return seq.to(next(base.parameters()).device).eval()


def _grpo_run(arm: str, model_name: str, steps: int, warmup: int, out: str) -> dict:
    """GRPO: the same prompts, group size and lengths in both arms; every completion runs the full length; the
    reward is a learned reward model (ours: its LoRA adapter and head on the policy's base; TRL: a separate
    model)."""
    import torch

    from bench import ours as fo
    from bench.models import SETTINGS, build_model

    s = SETTINGS[model_name]
    k, batch = s["grpo_generations"], s["ppo_batch"]
    recipe = _recipe(model_name, "ppo", out, 0, [])
    tokenizer = fo.load_tokenizer(recipe)
    torch.manual_seed(0)
    base = build_model(model_name, recipe)
    rows = [r["prompt"] for r in _ppo_rows(tokenizer, model_name, batch * (warmup + steps))]
    if arm == "trl":
        from bench import grpo_trl

        trainer = grpo_trl.make_trainer(
            base, _reward_model(model_name, recipe, base), tokenizer, rows, s, warmup + steps, out, s["precision"]
        )
        timer = grpo_trl.Timer(trainer, _sync)
        trainer.train()
        measured = slice(warmup, warmup + steps)
        wall = [w for w, _ in timer.steps[measured]]
        cpu = [c for _, c in timer.steps[measured]]
        generate, score = timer.generate[measured], timer.score[measured]
        held = sum(p.numel() for p in trainer.model.parameters()) + sum(
            p.numel() for m in trainer.reward_funcs if isinstance(m, torch.nn.Module) for p in m.parameters()
        )
        prompt_tokens = [len(fo.tokenize_prompt(tokenizer, r)) for r in rows]
    else:
        from peft import LoraConfig, TaskType, get_peft_model

        reward_folder = Path(out) / "reward"
        seq = get_peft_model(
            _reward_model(model_name, recipe, base),
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type=TaskType.SEQ_CLS, target_modules="all-linear"),
        )
        seq.save_pretrained(str(reward_folder))
        del seq
        config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type=TaskType.CAUSAL_LM,
            target_modules=fo.lora_targets(recipe, base.config.model_type),
        )
        model = fo.build_multi_adapter(base, config, reward_from=str(reward_folder), value_init=None)
        settings = fo.GrpoAlgorithm(
            num_generations=k,
            max_completion_length=s["response_length"],
            temperature=1.0,
            micro_batch_size=batch * k,
            learning_rate=1e-4,
            loss_type="dapo",
        )
        scorer = fo.Scorer(model, [], tokenizer, tokenizer.pad_token_id, False, batch * k)
        never = [base.config.vocab_size]  # a stop id the model cannot sample: every completion runs the full length
        engine = fo.GRPOEngine(model, settings, scorer, never, tokenizer.pad_token_id, seed=42)
        if arm == "ours-vllm":
            from finetune.rl.vllm_rollout import VllmSampler

            engine.sampler = VllmSampler(recipe, "ppo", model, tokenizer, engine)
        prompts = [fo.tokenize_prompt(tokenizer, r) for r in rows]
        prompt_tokens = [len(p) for p in prompts]
        wall, cpu, generate, score = [], [], [], []
        for j in range(warmup + steps):
            ids, mask = fo.left_pad(prompts[j * batch : (j + 1) * batch], tokenizer.pad_token_id)
            _sync()
            t, c = time.perf_counter(), time.process_time()
            stats = engine.step(ids.to(engine.device), mask.to(engine.device))
            _sync()
            if j >= warmup:
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                generate.append(stats["time_generate_s"])
                score.append(stats["time_score_s"])
        held = sum(p.numel() for p in model.parameters())
    # real tokens per update: each measured update's prompts, each answered k times at the full length
    tokens = [
        k * sum(prompt_tokens[j * batch : (j + 1) * batch]) + batch * k * s["response_length"]
        for j in range(warmup, warmup + steps)
    ]
    optimise = [w - g - sc for w, g, sc in zip(wall, generate, score)]
    n = len(wall)
    return {
        "tokens_per_s": sum(tokens) / sum(wall),
        "seconds_per_update": sum(wall) / n,
        "tokens_per_cpu_s": sum(tokens) / sum(cpu),
        "time_generate_s": sum(generate) / n,
        "time_score_s": sum(score) / n,
        "time_optimise_s": sum(optimise) / n,
        "generated_tokens_per_s": batch * k * s["response_length"] * n / sum(generate),
        "generation_share": sum(generate) / sum(wall),
        "completions_per_update": batch * k,
        "measured_steps": n,
        "peak_memory_mb": _peak_memory_mb(),
        "parameters_held": held,
        "attention": base.config._attn_implementation,
    }


def export_for_peer(model_name: str, folder: Path, n_prompts: int) -> Path:
    """What the PPO peer reads, as plain Hugging Face files: the model (config; weights unless the model
    is random at Phi-2 size, where the peer draws the same random init instead of reading 5.6 GB), the
    tokenizer with our chat template, the tokenized prompts ours uses, and the run's settings."""
    import torch

    from bench import ours as fo
    from bench.models import SETTINGS, build_model

    s = SETTINGS[model_name]
    recipe = _recipe(model_name, "ppo", str(folder / "unused"), 0, [])
    tokenizer = fo.load_tokenizer(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    weights = model_name != "phi2"
    if weights:
        torch.manual_seed(0)
        model = build_model(model_name, recipe)
        model.save_pretrained(folder, safe_serialization=True)
        attn = model.config._attn_implementation
        targets = fo.lora_targets(recipe, model.config.model_type)
    else:
        from bench.models import phi2_config

        config = phi2_config()
        config.pad_token_id = config.eos_token_id
        config.save_pretrained(folder)
        attn = fo.choose_attention(recipe.model.attn_implementation, fo.DTYPES[recipe.precision])[0]
        targets = fo.lora_targets(recipe, config.model_type)
    tokenizer.save_pretrained(folder)
    with open(folder / "prompts.jsonl", "w") as f:
        for ids in _ppo_prompts(tokenizer, model_name, n_prompts):
            f.write(json.dumps({"input_ids": ids}) + "\n")
    settings = {
        "batch": s["ppo_batch"],
        "micro_batch": s["ppo_micro_batch"],
        "response_length": s["response_length"],
        "ppo_epochs": s["ppo_epochs"],
        "temperature": 1.0,
        "precision": s["precision"],
        "weights": weights,
        "attention": attn,
        "lora_targets": targets,
        "pad_token_id": tokenizer.pad_token_id,
    }
    (folder / "bench_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return folder


def worker(stage: str, arm: str, model: str, steps: int, warmup: int, rows: int | None = None) -> dict:
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-") as out:
        if stage == "ppo":
            return _ppo_run(arm, model, steps, warmup, out)
        if stage == "grpo":
            return _grpo_run(arm, model, steps, warmup, out)
        return _trainer_run(stage, arm, model, steps, warmup, out, rows)


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


def _env(peer: bool = False) -> dict:
    """Children import this checkout's bench/ and finetune/; the peer gets FINETUNE_BENCH_PEER_SITE (a folder
    with TRL 1.12, as the GPU script installs it) in front of everything else when that is set."""
    site = os.environ.get("FINETUNE_BENCH_PEER_SITE") if peer else None
    path = (site, str(ROOT), os.environ.get("PYTHONPATH"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def peer_python() -> Path:
    """The interpreter the PPO peer runs in: FINETUNE_BENCH_PEER_PYTHON, else the peer venv's."""
    return Path(os.environ.get("FINETUNE_BENCH_PEER_PYTHON") or PEER_VENV / "bin" / "python")


def _child(stage, arm, model, steps, warmup, export: Path | None = None, rows: int | None = None) -> dict:
    if arm == "peer":
        cmd = [
            str(peer_python()),
            str(ROOT / "bench" / "ppo_peer.py"),
            str(export),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
        ]
    else:
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
        ] + (["--rows", str(rows)] if rows else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(peer=arm == "peer"))
    if res.returncode != 0:
        raise SystemExit(f"bench: {arm} run failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=list(ARMS), required=True)
    p.add_argument(
        "--model",
        choices=["tiny", "phi2-width", "phi2", "phi2-small"],
        default="tiny",
        help="tiny: builtin:tiny-phi (CPU); phi2-width: Phi-2's hidden size, heads, rotary, FFN and vocabulary "
        "with 2 layers, random weights, fp32 (CPU); phi2: Phi-2 architecture, random weights, fp16 (GPU); "
        "phi2-small: the same shape rules at CPU size (a check of the phi2 path)",
    )
    p.add_argument("--baseline", action="store_true", help="run the baseline arm only")
    p.add_argument(
        "--arms",
        help="comma-separated arms (default: ours and the strongest peer: trl-tuned for "
        "sft/dpo/reward, peer for ppo); one of: "
        + "; ".join(f"{st}: {', '.join(a)}" for st, a in ARMS.items())
        + "; sft/dpo: ours+liger, trl-tuned+liger",
    )
    p.add_argument("--steps", type=int, default=8, help="measured steps (PPO: updates) per run")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing starts")
    p.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating arm order")
    p.add_argument(
        "--rows",
        type=int,
        help="SFT / DPO / reward rows made (default: the model's setting); DPO's precomputed reference pass "
        "covers them all",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (OMP_NUM_THREADS; default: torch's, one per core). On a machine other "
        "people load, 1 avoids the 2-thread barrier waits a descheduled thread causes; recorded per run",
    )
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="SFT / DPO / reward: run the measured steps under torch.profiler and report where each arm's CPU time "
        "goes, by kind of op (the profiler's overhead makes these runs' speeds not comparable to unprofiled ones)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the arms in this process, one after the other "
        "(the GPU script's CPU dry run: a check of the code paths, whose peak memory is not per arm)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's torch reads it at start
        torch.set_num_threads(args.threads)  # this process's (--in-process runs)
    if args.profile:
        os.environ["FINETUNE_BENCH_PROFILE"] = "1"  # the workers read it
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (timing starts at the end of a warm-up step)")
    if args.export:  # child: the PPO peer's plain Hugging Face export
        import logging

        from bench.models import SETTINGS

        logging.disable(logging.WARNING)
        export_for_peer(args.model, Path(args.export), SETTINGS[args.model]["ppo_batch"] * (args.warmup + args.steps))
        return 0
    if args.worker:
        print(json.dumps(worker(args.stage, args.worker, args.model, args.steps, args.warmup, args.rows)))
        return 0
    default = ["ours", {"ppo": "peer", "grpo": "trl"}.get(args.stage, "trl-tuned")]
    arms = ["baseline"] if args.baseline else (args.arms.split(",") if args.arms else default)
    unknown = [a for a in arms if not known_arm(args.stage, a)]
    if unknown:
        p.error(
            f"unknown arm(s) {unknown} for {args.stage}; choose from {list(ARMS[args.stage])}"
            + (" (ours and trl-tuned also as ours+liger, trl-tuned+liger)" if args.stage in ("sft", "dpo") else "")
        )
    export = None
    if "peer" in arms:
        if not peer_python().is_file():
            p.error(
                f"the PPO peer's virtual environment is missing ({PEER_VENV}); make it with "
                "`bash bench/peer_env.sh` (TRL 1.12.0 beside the project's torch/transformers)"
            )
        export = Path(tempfile.mkdtemp(prefix="bench-peer-export-"))
        cmd = [
            sys.executable,
            __file__,
            "--stage",
            "ppo",
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--export",
            str(export),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env())
        if res.returncode != 0:
            raise SystemExit(f"bench: export for the PPO peer failed:\n{res.stderr[-4000:]}")
    load_before = _load()
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    try:
        for r in range(args.repeats):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                before = os.getloadavg()
                if args.in_process and arm != "peer":
                    result = worker(args.stage, arm, args.model, args.steps, args.warmup, args.rows)
                else:
                    result = _child(args.stage, arm, args.model, args.steps, args.warmup, export, args.rows)
                result["load_average_1m"] = _load()
                result["uptime_before"], result["uptime_after"] = list(before), list(os.getloadavg())  # 1, 5, 15 min
                runs[arm].append(result)
                print(
                    f"  run {r + 1}/{args.repeats} {arm:<18} {result['tokens_per_s']:10.1f} tokens/s "
                    f"({result['tokens_per_cpu_s']:.1f} per CPU-s), load {before[0]:.1f} -> {_load():.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if export is not None:
            shutil.rmtree(export, ignore_errors=True)
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
        "arms": {a: {"what": describe(args.stage, a), "median": _median(runs[a]), "runs": runs[a]} for a in arms},
    }
    if "peer" in arms:
        report["arms"]["peer"]["trl"] = runs["peer"][0].get("trl")
    if args.stage == "dpo":
        for a in arms:  # a run of the recipe's length (tiny: 4 epochs) pays a precompute pass once
            m, epochs = report["arms"][a]["median"], 4
            work = epochs * m["dataset_tokens"]
            m["tokens_per_s_4_epochs"] = work / (m.get("precompute_ref_s", 0.0) + work / m["tokens_per_s"])
    first = report["arms"][arms[0]]["median"]
    report["ratios"] = {
        a: {
            "tokens_per_s": first["tokens_per_s"] / report["arms"][a]["median"]["tokens_per_s"],
            "tokens_per_cpu_s": first["tokens_per_cpu_s"] / report["arms"][a]["median"]["tokens_per_cpu_s"],
            "peak_memory": first["peak_memory_mb"] / report["arms"][a]["median"]["peak_memory_mb"],
        }
        for a in arms[1:]
    }
    if len(arms) > 1:  # the first arm against the second (ours against its strongest peer by default)
        report["compared"] = [arms[0], arms[1]]
        report["ratio_tokens_per_s"] = report["ratios"][arms[1]]["tokens_per_s"]
        report["ratio_peak_memory"] = report["ratios"][arms[1]]["peak_memory"]
    print(
        f"\n{args.stage} on {args.model} ({report['machine'].get('gpu', report['machine'].get('cpu_model', ''))}), "
        f"median of {args.repeats}, load {load_before:.2f} -> {report['load_average_1m_after']:.2f}"
    )
    for a in arms:
        m = report["arms"][a]["median"]
        line = (
            f"  {a:<18} {m['tokens_per_s']:10.1f} real tokens/s ({m['tokens_per_cpu_s']:.1f} per CPU-s)  "
            f"peak {m['peak_memory_mb']:8.0f} MB"
        )
        if args.stage in ("ppo", "grpo"):
            line += (
                f"  {m['seconds_per_update']:.2f} s/update = generate {m['time_generate_s']:.2f} + score "
                f"{m['time_score_s']:.2f} + optimise {m['time_optimise_s']:.2f}"
                f" (generation {m['generation_share']:.0%})"
            )
        if args.stage == "dpo":
            line += f"  ({m['tokens_per_s_4_epochs']:.1f} tokens/s over 4 epochs incl. any precompute)"
        if "forward_positions_per_real_token" in m:
            line += f"  {m['forward_positions_per_real_token']:.2f} positions computed per real token"
        print(line)
        profile = runs[a][0].get("profile")
        if profile:
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in profile["share_by_kind"].items())
            print(f"    profile (run 1): {profile['self_cpu_s_per_step']:.2f} CPU-s per step: {kinds}")
    for a, ratio in report["ratios"].items():
        print(
            f"  ratio {arms[0]}/{a}: {ratio['tokens_per_s']:.2f}x tokens/s ({ratio['tokens_per_cpu_s']:.2f}x per "
            f"CPU-s), {ratio['peak_memory']:.2f}x peak memory"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
