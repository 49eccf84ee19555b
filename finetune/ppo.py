"""PPO stage: RLHF with a learned (and/or rule-based) reward; LoRA policy, value and reward on one base.

    accelerate launch finetune/ppo.py RECIPE [key=value ...]
    finetune ppo RECIPE [key=value ...]

load recipe -> prompts -> base (with the adapters the policy and reward model share merged in) +
policy / value / reward adapters -> held-out correctness before -> updates (rollout, score, PPO
epochs; checkpoints, resumable) -> correctness after -> save the policy adapter -> summary.

TRL no longer has a PPOTrainer (trl#7020), so the engine is ours: finetune/rl.py, finetune/rl_math.py,
design in shared/design/ppo.md and docs/ppo.md.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from finetune.outputs import (commit_dir, print_summary, rate, setup_logging, staging_dir, write_json,
                              write_stage_files)
from finetune.recipe import Recipe, RecipeError, stage_main

log = logging.getLogger("finetune.ppo")
CHECKPOINT_PREFIX = "update-"


# ----------------------------------------------------------------------------- where things start


def resolve_start(recipe: Recipe) -> tuple[list[str], str | None, str | None]:
    """(adapters merged into the shared base, policy adapter to copy or None, reward adapter or None).

    The reward model only scores correctly on the base it was trained on, so the shared base is the
    reward model's own start (normally the SFT output). The policy's chain must begin with it; what
    follows (normally the DPO adapter) becomes the trainable policy, a frozen copy the reference.
    """
    from finetune.training import adapter_chain, check_adapter_folder

    s = recipe.ppo
    out = Path(recipe.output_dir)
    if s.start_from == "base":
        policy_chain = []
    else:
        start = Path(s.start_from).expanduser() if s.start_from else out / "dpo"
        check_adapter_folder(recipe, "ppo.start_from", start,
                             f"run `finetune dpo {recipe.source}` first, or set ppo.start_from to another stage "
                             f"output (e.g. ppo.start_from={out / 'sft'}) or base")
        policy_chain = adapter_chain(start)
    reward = None
    if (s.reward_from or "").lower() != "none":
        reward = str(Path(s.reward_from).expanduser() if s.reward_from else out / "reward")
        check_adapter_folder(recipe, "ppo.reward_from", reward,
                             f"run `finetune reward {recipe.source}` first, or set ppo.reward_from=none and name a "
                             "ppo.reward_function")
    elif not s.reward_function:
        raise RecipeError(f"{recipe.source}: ppo.reward_from is none and no ppo.reward_function is set: PPO needs a "
                          "reward; train one (finetune reward) or name a rule-based function as module:function")
    if reward is None:  # no reward adapter to share a base with: merge the whole policy chain, fresh LoRA
        return policy_chain, None, None
    shared = adapter_chain(reward)[:-1]
    if policy_chain[: len(shared)] != shared or len(policy_chain) - len(shared) > 1:
        raise RecipeError(
            f"{recipe.source}: ppo: the policy ({' + '.join(policy_chain) or 'the base'}) and the reward model "
            f"(trained on {' + '.join(shared) or 'the base'}) must share their base: the policy may add at most one "
            "adapter (e.g. DPO) on top of what the reward model was trained on. Train the reward model from the "
            "same SFT output (reward.start_from) or start PPO from it (ppo.start_from)")
    rest = policy_chain[len(shared):]
    return shared, (rest[0] if rest else None), reward


def load_reward_function(spec: str | None, recipe: Recipe):
    """`module:function` -> callable(prompt, response, example) -> float."""
    if not spec:
        return None
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise RecipeError(f"{recipe.source}: ppo.reward_function: {spec!r} must look like module:function "
                          "(e.g. my_rewards:exact_match)")
    if str(recipe.base_dir) not in sys.path:
        sys.path.insert(0, str(recipe.base_dir))
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"{recipe.source}: ppo.reward_function: cannot load {spec!r} ({e}); the module must be "
                          "importable (installed, or a .py file beside the recipe)") from None
    takes_example = len(inspect.signature(fn).parameters) >= 3
    return (lambda p, r, ex: float(fn(p, r, ex))) if takes_example else (lambda p, r, ex: float(fn(p, r)))


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """The sequence score: learned reward (normalised with the start policy's statistics) plus the
    weighted rule-based reward. Holds the rows of the current batch for the rule function."""

    def __init__(self, model, rule, rule_weight: float, tokenizer, pad_id: int, normalize: bool, micro: int):
        self.model, self.rule, self.rule_weight = model, rule, rule_weight
        self.tokenizer, self.pad_id, self.normalize, self.micro = tokenizer, pad_id, normalize, micro
        self.norm: dict | None = None  # {"mean", "std"} of the learned reward, fixed from the first rollout
        self.rows: list[dict] = []

    @torch.no_grad()
    def __call__(self, ids, mask, prompt_width, responses, resp_mask, has_stop):
        from finetune.rl import REWARD, all_mean
        from finetune.rl_math import reward_readout_index

        total = torch.zeros(len(ids), device=ids.device)
        info = {}
        if self.model.reward_head is not None:
            index = reward_readout_index(ids, mask, self.pad_id)
            with self.model.active(REWARD):
                raw = torch.cat([self.model.reward(ids[i:i + self.micro], mask[i:i + self.micro],
                                                   index[i:i + self.micro]) for i in range(0, len(ids), self.micro)])
            if self.normalize and self.norm is None:
                stats = all_mean({"m": raw.mean().item(), "m2": (raw ** 2).mean().item()}, ids.device)
                self.norm = {"mean": stats["m"], "std": max(stats["m2"] - stats["m"] ** 2, 0.0) ** 0.5 or 1.0}
                log.info("learned reward on the start policy's samples: mean %.4f std %.4f (used to normalise)",
                         self.norm["mean"], self.norm["std"])
            learned = (raw - self.norm["mean"]) / self.norm["std"] if self.normalize else raw
            total += learned
            info["score_learned_raw"] = raw.mean().item()
        if self.rule is not None:
            rule = torch.tensor([self.rule(row["prompt"][-1]["content"], text, row.get("example", {}))
                                 for row, text in zip(self.rows, self.decode(responses, resp_mask))],
                                device=ids.device)
            total += self.rule_weight * rule
            info["score_rule"] = rule.mean().item()
        info["score"] = total.mean().item()
        return total, info

    def decode(self, responses, resp_mask) -> list[str]:
        return [self.tokenizer.decode(r[: int(m.sum())], skip_special_tokens=True).strip()
                for r, m in zip(responses.tolist(), resp_mask)]


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: Path) -> Path | None:
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _run_identity(recipe: Recipe, shared: list[str], policy_from, reward_from) -> dict:
    import hashlib

    def digest(folder):
        f = Path(folder) / "adapter_model.safetensors"
        return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None

    return {"model": recipe.model.name_or_path, "template": recipe.template.name,
            "lora": recipe.lora.model_dump(mode="json"),
            "adapters": {str(f): digest(f) for f in [*shared, policy_from, reward_from] if f}}


def save_checkpoint(root: Path, update: int, model, engine, scorer, state, keep: int = 2) -> None:
    """`<output_dir>/ppo-checkpoints/update-N/`: adapters, value head, optimisers, beta, reward
    normalisation, and every process's RNG state; written to a staging folder, then renamed."""
    from peft import get_peft_model_state_dict

    from finetune.rl import POLICY, VALUE

    target = root / f"{CHECKPOINT_PREFIX}{update}"
    tmp = staging_dir(target, reset=state.is_main_process)
    state.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{state.process_index}.pt")
    if state.is_main_process:
        torch.save({"policy": get_peft_model_state_dict(model.peft, adapter_name=POLICY),
                    "value": get_peft_model_state_dict(model.peft, adapter_name=VALUE),
                    "value_head": model.value_head.state_dict()}, tmp / "weights.pt")
        torch.save(engine.state_dict(), tmp / "engine.pt")
        write_json(tmp / "state.json", {"update": update, "norm": scorer.norm, "world_size": state.num_processes})
    state.wait_for_everyone()
    if state.is_main_process:
        commit_dir(tmp, target)
        done = sorted((p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()),
                      key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    state.wait_for_everyone()


def load_checkpoint(folder: Path, model, engine, scorer, state) -> int:
    from peft import set_peft_model_state_dict

    from finetune.rl import POLICY, VALUE

    meta = json.loads((folder / "state.json").read_text())
    if meta["world_size"] != state.num_processes:
        raise RecipeError(f"{folder}: saved by {meta['world_size']} processes, resumed with {state.num_processes}; "
                          "resume with the same process count or set ppo.resume=false")
    weights = torch.load(folder / "weights.pt", map_location=engine.device, weights_only=False)
    set_peft_model_state_dict(model.peft, weights["policy"], adapter_name=POLICY)
    set_peft_model_state_dict(model.peft, weights["value"], adapter_name=VALUE)
    model.value_head.load_state_dict(weights["value_head"])
    engine.load_state_dict(torch.load(folder / "engine.pt", map_location=engine.device, weights_only=False))
    scorer.norm = meta["norm"]
    _set_rng_state(torch.load(folder / f"rng_{state.process_index}.pt", weights_only=False))
    return meta["update"]


# ----------------------------------------------------------------------------- the stage


class Processes:
    """Rank, world size, device and barrier of this launch. Taken from torch.distributed when it is
    initialised: accelerate's PartialState reports rank 0 of 1 on every process under its DeepSpeed
    launcher on CPU (accelerate 1.15), which made both processes write the same checkpoint."""

    def __init__(self, partial_state):
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.device = partial_state.device
        self.process_index = self._dist.get_rank() if self._dist else partial_state.process_index
        self.num_processes = self._dist.get_world_size() if self._dist else partial_state.num_processes
        self.is_main_process = self.process_index == 0

    def wait_for_everyone(self) -> None:
        if self._dist is not None:
            self._dist.barrier()


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _window_mean(log_rows: list[dict], key: str, last: bool) -> float | None:
    values = [r[key] for r in log_rows if key in r]
    if not values:
        return None
    k = max(1, round(len(values) * 0.1))
    part = values[-k:] if last else values[:k]
    return sum(part) / len(part)


def _earlier_correctness(recipe: Recipe) -> dict:
    out = {}
    for stage in ("sft", "dpo"):
        f = recipe.stage_dir(stage) / "metrics.json"
        if f.is_file():
            out[f"correct_rate_{stage}"] = json.loads(f.read_text()).get("correct_rate_after")
    return out


def run(recipe: Recipe) -> dict:
    from accelerate import PartialState
    from peft import LoraConfig, TaskType
    from tqdm.auto import tqdm
    from transformers import get_scheduler, set_seed

    from finetune.chat_template import end_of_turn_ids
    from finetune.data import tokenize_prompts, to_prompt, train_eval_rows
    from finetune.evaluation import held_out_correctness
    from finetune.modeling import base_fingerprint, load_model, load_tokenizer, lora_targets, template_for
    from finetune.rl import PPOEngine, PPOSettings, adapters_in_sync, build_model
    from finetune.rl_math import left_pad, prompt_indices
    from finetune.training import check_precision, checkpoint_dir

    s = recipe.ppo
    check_precision(recipe)
    state = Processes(PartialState())
    main = state.is_main_process
    setup_logging(main)
    if recipe.deepspeed and main:
        log.info("ppo: the DeepSpeed config is not used by this stage: adapters are trained with plain data "
                 "parallel (all-reduced gradients) over one shared frozen base; see docs/ppo.md")
    if s.rollout_batch_size % s.mini_batches:
        raise RecipeError(f"{recipe.source}: ppo.mini_batches: {s.mini_batches} does not divide "
                          f"ppo.rollout_batch_size {s.rollout_batch_size}")
    shared, policy_from, reward_from = resolve_start(recipe)
    rule = load_reward_function(s.reward_function, recipe)
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    stop_ids, pad_id = end_of_turn_ids(tokenizer, template), tokenizer.pad_token_id

    train_rows, eval_rows, train_report, eval_report = train_eval_rows(s.data, recipe, recipe.seed, to_prompt)
    prompts, kept = tokenize_prompts(train_rows, tokenizer, template, s.max_prompt_length, train_report, "train",
                                     unique=s.unique_prompts)
    train_rows = [train_rows[i] for i in kept]

    base = load_model(recipe, merge=shared).to(state.device)
    policy_config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=0.0,
                               target_modules=lora_targets(recipe, base.config.model_type),
                               task_type=TaskType.CAUSAL_LM)
    model = build_model(base, policy_config, policy_from, reward_from, s.value_init)
    fingerprint = base_fingerprint(model.peft)
    settings = PPOSettings.from_section(s)
    scorer = Scorer(model, rule, s.reward_function_weight, tokenizer, pad_id, s.normalize_reward,
                    s.micro_batch_size)
    engine = PPOEngine(model, settings, scorer, stop_ids, pad_id, seed=recipe.seed,
                       fp16=recipe.precision == "fp16")
    if s.lr_scheduler_type != "constant":
        engine.schedulers = [get_scheduler(s.lr_scheduler_type, opt, num_warmup_steps=0, num_training_steps=s.updates)
                             for opt in (engine.policy_opt, engine.value_opt)]
    trainable = sum(p.numel() for p in model.policy_parameters() + model.value_parameters())
    log.info("one base, adapters %s; %d trainable parameters (policy + value + value head); reference = %s",
             list(model.peft.peft_config), trainable,
             f"frozen copy of {policy_from}" if policy_from else "the base with adapters disabled")

    root = checkpoint_dir(recipe, "ppo")
    identity = _run_identity(recipe, shared, policy_from, reward_from)
    marker, log_file = root / "run_identity.json", root / "updates.jsonl"
    last = latest_checkpoint(root) if s.resume and root.is_dir() else None
    if last and marker.is_file() and json.loads(marker.read_text()) != identity:
        raise RecipeError(f"{recipe.source}: ppo.resume: the checkpoints in {root} belong to another run (other base, "
                          f"template, LoRA or start adapters); delete that folder or set ppo.resume=false")
    start_update = 0
    if last:
        start_update = load_checkpoint(last, model, engine, scorer, state)
        log.info("resuming PPO from %s (update %d of %d)", last, start_update, s.updates)
    history: list[dict] = []
    if main:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(identity, indent=2))
        if last and log_file.is_file():
            history = [r for r in map(json.loads, log_file.read_text().splitlines()) if r["update"] <= start_update]
        log_file.write_text("".join(json.dumps(r) + "\n" for r in history))
    if not last:
        set_seed(recipe.seed + state.process_index)  # each process samples its own responses

    correct_before = None
    if main:
        correct_before, _ = held_out_correctness(model.peft, tokenizer, template, eval_rows, s.eval_generate_rows,
                                                 s.max_new_tokens)
    started = time.time()
    bar = tqdm(range(start_update, s.updates), initial=start_update, total=s.updates, desc="ppo",
               disable=not main, dynamic_ncols=True)
    for update in bar:
        idx = prompt_indices(len(prompts), s.rollout_batch_size, update, state.process_index,
                             state.num_processes, recipe.seed)
        scorer.rows = [train_rows[i] for i in idx]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        stats = engine.step(ids.to(state.device), mask.to(state.device))
        stats = {"update": update + 1, **stats, "lr": engine.policy_opt.param_groups[0]["lr"]}
        if main:
            history.append(stats)
            with log_file.open("a") as fh:
                fh.write(json.dumps(stats) + "\n")
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}",
                            len=f"{stats['response_length']:.1f}", eos=f"{stats['eos_rate']:.2f}")
            if (update + 1) % recipe.logging.logging_steps == 0:
                log.info("update %d: score %.4f kl %.4f len %.1f eos %.2f pg %.4f vf %.4f clipfrac %.3f",
                         update + 1, stats["score"], stats["kl"], stats["response_length"], stats["eos_rate"],
                         stats["policy_loss"], stats["value_loss"], stats["clipfrac"])
        if (update + 1) % s.save_every == 0 or update + 1 == s.updates:
            save_checkpoint(root, update + 1, model, engine, scorer, state)
    bar.close()
    runtime = time.time() - started

    correct_after = replies = None
    if main:
        correct_after, replies = held_out_correctness(model.peft, tokenizer, template, eval_rows, s.eval_generate_rows,
                                                      s.max_new_tokens)
    base_unchanged = base_fingerprint(model.peft) == fingerprint
    in_sync = adapters_in_sync(model)
    ran = [r for r in history if r["update"] > start_update]
    gen_share = (sum(r["time_generate_s"] for r in ran) /
                 max(sum(r["time_generate_s"] + r["time_score_s"] + r["time_optimise_s"] for r in ran), 1e-9)
                 if ran else None)
    metrics = {
        "updates": len(history), "score_start": _window_mean(history, "score", last=False),
        "score_end": _window_mean(history, "score", last=True), "kl_end": _window_mean(history, "kl", last=True),
        "eos_rate_end": _window_mean(history, "eos_rate", last=True),
        **{f"{part}_{edge}": _window_mean(history, part, last=edge == "end")
           for part in ("score_learned_raw", "score_rule") for edge in ("start", "end")},
        "response_length_end": _window_mean(history, "response_length", last=True),
        "correct_rate_before": correct_before, "correct_rate_after": correct_after, **_earlier_correctness(recipe),
        "train_runtime_s": runtime, "seconds_per_update": runtime / len(ran) if ran else None,
        "generation_share": gen_share, "peak_memory_mb": _peak_memory_mb(state.device),
        "resumed_from_update": start_update or None, "base_fingerprint": fingerprint, "base_unchanged": base_unchanged,
        "adapters_in_sync": in_sync, "start_from": shared, "policy_initialised_from": policy_from, "reward_from": reward_from,
        "reward_function": s.reward_function, "reward_normalisation": scorer.norm, "beta_end": engine.beta,
        "train_prompts": len(prompts), "dropped_overlong_prompts": train_report.dropped_overlong,
        "repeated_prompts": train_report.repeated_prompts,
        "processes": state.num_processes,
    }
    out = recipe.stage_dir("ppo")
    if main:
        save_output(out, model, tokenizer, recipe, metrics, log_file)
        earlier = ", ".join(f"{k.split('_')[-1].upper()} {rate(v)}" for k, v in _earlier_correctness(recipe).items())
        print_summary("PPO done", [
            ("score (first -> last 10%)", f"{metrics['score_start']:.3f} -> {metrics['score_end']:.3f}"),
            *([("learned reward (raw)", f"{metrics['score_learned_raw_start']:.3f} -> "
                                        f"{metrics['score_learned_raw_end']:.3f}")]
              if metrics["score_learned_raw_start"] is not None else []),
            *([("rule reward", f"{metrics['score_rule_start']:.3f} -> {metrics['score_rule_end']:.3f}")]
              if metrics["score_rule_start"] is not None else []),
            ("KL at the end", f"{metrics['kl_end']:.3f} nats/response (beta {engine.beta:.3g})"),
            ("EOS rate at the end", rate(metrics["eos_rate_end"])),
            ("held-out correct", f"{rate(correct_before)} -> {rate(correct_after)}"
                                 + (f" (earlier stages: {earlier})" if earlier else "")),
            ("updates", f"{len(history)} x {s.rollout_batch_size * state.num_processes} episodes, {runtime:.1f}s "
                        f"({rate(gen_share)} generating), peak memory {metrics['peak_memory_mb']:.0f} MB"),
            ("base unchanged", str(base_unchanged)),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("output", str(out)),
        ])
    state.wait_for_everyone()
    return metrics


def save_output(out: Path, model, tokenizer, recipe: Recipe, metrics: dict, log_file: Path) -> None:
    """`<output_dir>/ppo/`: the policy adapter at the top (a plain PEFT folder), the value adapter and
    head under value/, tokenizer + template, recipe.yaml, metrics.json, updates.jsonl."""
    from finetune.rl import POLICY, VALUE

    tmp = staging_dir(out)
    try:
        model.peft.save_pretrained(str(tmp), selected_adapters=[POLICY, VALUE])
        for f in (tmp / POLICY).iterdir():
            f.rename(tmp / f.name)
        (tmp / POLICY).rmdir()
        torch.save(model.value_head.state_dict(), tmp / VALUE / "value_head.pt")
        tokenizer.save_pretrained(str(tmp))
        shutil.copy(log_file, tmp / "updates.jsonl")
        write_stage_files(tmp, recipe, metrics)
        commit_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    return stage_main("ppo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
