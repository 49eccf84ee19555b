"""The PPO peer: TRL 1.12.0's PPOTrainer (the last TRL with one) on what bench/run.py exported.

Runs inside the peer's virtual environment (bench/peer_env.sh), never in the project's: it imports
no finetune code, only TRL 1.12 / transformers / torch, and reads a plain Hugging Face export
(config, weights unless random, tokenizer with the chat template, tokenized prompts, settings):

    ~/.cache/finetune-bench/trl112-venv/bin/python bench/ppo_peer.py EXPORT_DIR --steps 4 --warmup 2

It sets TRL up as its own PPO example does with LoRA (trl/examples/scripts/ppo/ppo.py): the policy is
the base with a LoRA adapter (the reference is the same model with the adapter disabled), the value
model and the reward model are separate `AutoModelForSequenceClassification` copies of the base, the
value model trained in full. Same prompts in the same order, batch, response length (every rollout
runs the full length: no stop token, as TRL does without one), PPO epochs, micro-batch and LoRA as
ours. Prints one JSON line with the same fields as bench/run.py's PPO arm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _models(export: Path, s: dict, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[s["precision"]]
    attn = s["attention"]

    def make(cls, dtype, **kw):
        if s["weights"]:
            return cls.from_pretrained(export, dtype=dtype, attn_implementation=attn, **kw).to(device)
        config = AutoConfig.from_pretrained(export, **kw)  # random weights (Phi-2 size): same init rule as ours
        torch.manual_seed(0)
        with torch.device(device):
            return cls.from_config(config, dtype=dtype, attn_implementation=attn)

    policy = make(AutoModelForCausalLM, dtype)
    # The value model is trained in full; its weights stay fp32 under fp16 mixed precision (fp16 master weights
    # fail in the grad scaler's unscale step). The reward model is frozen and held in the run's precision.
    value = make(AutoModelForSequenceClassification, torch.float32, num_labels=1)
    reward = make(AutoModelForSequenceClassification, dtype, num_labels=1)
    for m in (value, reward):
        m.config.pad_token_id = s["pad_token_id"]
    return policy, value, reward


def run(export: Path, steps: int, warmup: int) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    s = json.loads((export / "bench_settings.json").read_text())
    if s["precision"] == "fp16":
        os.environ["ACCELERATE_MIXED_PRECISION"] = "fp16"
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as impl

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(export)
    tokenizer.padding_side = "left"
    B, R, micro = s["batch"], s["response_length"], s["micro_batch"]
    prompts = [json.loads(line) for line in (export / "prompts.jsonl").read_text().splitlines()]
    prompts = prompts[: B * (warmup + steps)]
    policy, value, reward = _models(export, s, device)

    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=s["lora_targets"])
    out = tempfile.mkdtemp(prefix="bench-peer-")
    args = PPOConfig(
        output_dir=out,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=B // micro,
        num_mini_batches=1,
        num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=B,
        response_length=R,
        temperature=s["temperature"],
        total_episodes=len(prompts),
        stop_token=None,
        learning_rate=1e-5,
        kl_coef=0.05,
        seed=42,
        fp16=s["precision"] == "fp16",
        bf16=s["precision"] == "bf16",
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        num_sample_generations=0,
        disable_tqdm=True,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
    )

    # timing: generation = TRL's batch_generation; the optimisation starts at the first forward through the
    # policy+value wrapper with gradients; an update ends at on_step_end (the next one starts there)
    marks: list[dict] = []
    current: dict = {}
    inner_generation, inner_forward = impl.batch_generation, impl.forward

    def timed_generation(model, queries, *a, **k):
        if device == "cuda":
            torch.cuda.synchronize()
        current["generate_start"] = time.perf_counter()
        current.setdefault("cpu_start", time.process_time())
        query_responses, logits = inner_generation(model, queries, *a, **k)
        if device == "cuda":
            torch.cuda.synchronize()
        current["generate_end"] = time.perf_counter()
        pad = tokenizer.pad_token_id
        current["response_tokens"] = int(len(queries) * (query_responses.shape[1] - queries.shape[1]))
        current["real_tokens"] = int((queries != pad).sum()) + current["response_tokens"]
        return query_responses, logits

    def timed_forward(model, *a, **k):
        if hasattr(model, "value_model") and "optimise_start" not in current:
            if device == "cuda":
                torch.cuda.synchronize()
            current["optimise_start"] = time.perf_counter()
        return inner_forward(model, *a, **k)

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            current["end"], current["cpu_end"] = time.perf_counter(), time.process_time()
            marks.append(dict(current))
            current.clear()
            current["start"], current["cpu_start"] = marks[-1]["end"], marks[-1]["cpu_end"]

    impl.batch_generation, impl.forward = timed_generation, timed_forward
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        train_dataset=Dataset.from_list(prompts),
        value_model=value,
        peft_config=lora,
        callbacks=[Marks()],
    )
    # the same prompts in the same order as ours (TRL shuffles; one process, so no sampler to keep in sync)
    trainer.dataloader = DataLoader(
        Dataset.from_list(prompts),
        batch_size=B,
        shuffle=False,
        drop_last=True,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
    held = {id(p): p.numel() for m in (trainer.model, trainer.reward_model) for p in m.parameters()}
    trainer.train()
    measured = marks[warmup:]
    for m in measured:
        m.setdefault("start", m["generate_start"])

    def mean(f):
        return sum(f(m) for m in measured) / len(measured)

    update = mean(lambda m: m["end"] - m["start"])
    generate = mean(lambda m: m["generate_end"] - m["generate_start"])
    return {
        "tokens_per_s": sum(m["real_tokens"] for m in measured) / sum(m["end"] - m["start"] for m in measured),
        "seconds_per_update": update,
        "tokens_per_cpu_s": sum(m["real_tokens"] for m in measured)
        / sum(m["cpu_end"] - m["cpu_start"] for m in measured),
        "cpu_seconds_per_update": mean(lambda m: m["cpu_end"] - m["cpu_start"]),
        "time_generate_s": generate,
        "time_score_s": mean(lambda m: m["optimise_start"] - m["generate_end"]),
        "time_optimise_s": mean(lambda m: m["end"] - m["optimise_start"]),
        "time_other_s": mean(lambda m: m["generate_start"] - m["start"]),
        "generated_tokens_per_s": sum(m["response_tokens"] for m in measured) / (generate * len(measured)),
        "generation_share": generate / update,
        "response_length": mean(lambda m: m["response_tokens"]) / B,
        "measured_steps": len(measured),
        "peak_memory_mb": _peak_memory_mb(),
        "parameters_held": sum(held.values()),
        "attention": policy.config._attn_implementation,
        "trl": __import__("trl").__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("export", type=Path)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(run(args.export, args.steps, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
