"""PPO stage: RLHF with a learned (and/or rule-based) reward; LoRA policy, value and reward on one base.

    accelerate launch finetune/ppo.py RECIPE [key=value ...]
    finetune ppo RECIPE [key=value ...]

load recipe -> prompts -> base (with the adapters the policy and reward model share merged in) +
policy / value / reward adapters -> held-out correctness before -> updates (rollout, score, PPO
epochs; checkpoints, resumable) -> correctness after -> save the policy adapter -> summary.

TRL no longer has a PPOTrainer (trl#7020), so the engine is ours: finetune/rl/ (engine, pure
functions, scoring, checkpoints); the design and where it departs from the usual recipe: docs/ppo.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.chat_template import end_of_turn_ids
from finetune.core import distributed, tracking
from finetune.core.batching import left_pad
from finetune.core.data import DataError, DataReport, to_prompt, tokenize_prompts, train_eval_rows
from finetune.core.evaluation import Samples, held_out_correctness
from finetune.core.lineage import adapter_chain, check_adapter_folder, start_chain
from finetune.core.modeling import base_fingerprint, load_model, load_tokenizer, lora_targets, template_for
from finetune.core.outputs import commit_dir, discard, read_metrics, staging_dir, write_stage_files
from finetune.core.ownership import stage_kind
from finetune.core.progress import progress, step_line
from finetune.core.resume import choose_checkpoint, run_identity
from finetune.core.summary import figure, print_summary, rate
from finetune.core.training import check_precision
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError
from finetune.rl import checkpoints
from finetune.rl.engine import POLICY, VALUE, MultiAdapterModel, PPOEngine, adapters_in_sync, build_model
from finetune.rl.functional import prompt_indices
from finetune.rl.rules import learned_weight, load_rules
from finetune.rl.scoring import Scorer

log = logging.getLogger("finetune.ppo")


# ----------------------------------------------------------------------------- where things start


def resolve_start(recipe: Recipe) -> tuple[list[str], str | None, str | None]:
    """(adapters merged into the shared base, policy adapter to copy or None, reward adapter or None).

    The reward model only scores correctly on the base it was trained on, so the shared base is the
    reward model's own start (normally the SFT output). The policy's chain must begin with it; what
    follows (normally the DPO adapter) becomes the trainable policy, a frozen copy the reference.
    """
    terms = recipe.ppo.reward_terms()
    policy_chain = start_chain(recipe, "ppo", "start_from")
    reward_dir = recipe.input_dir("ppo", "reward_from")
    if not terms:
        raise RecipeError(
            f"{recipe.source}: ppo.reward_from is none and no ppo.reward_function is set: PPO needs a "
            "reward; train one (finetune reward) or name a rule-based function as module:function (ppo.rewards)"
        )
    if reward_dir is None:  # no reward adapter to share a base with: merge the whole policy chain, fresh LoRA
        return policy_chain, None, None
    key = next(f"ppo.{k}" for k, t in terms if t.function is None)
    reward = str(
        check_adapter_folder(
            recipe,
            key,
            reward_dir,
            f"run `finetune reward {recipe.source}` first, or use only rule rewards (ppo.rewards: "
            "[{function: module:name}])",
        )
    )
    shared = adapter_chain(reward)[:-1]  # what the reward model was trained on top of
    if policy_chain[: len(shared)] != shared or len(policy_chain) - len(shared) > 1:
        raise RecipeError(
            f"{recipe.source}: ppo: the policy ({' + '.join(policy_chain) or 'the base'}) and the reward model "
            f"(trained on {' + '.join(shared) or 'the base'}) must share their base: the policy may add at most one "
            "adapter (e.g. DPO) on top of what the reward model was trained on. Train the reward model from the "
            "same SFT output (reward.start_from) or start PPO from it (ppo.start_from)"
        )
    rest = policy_chain[len(shared) :]
    return shared, (rest[0] if rest else None), reward


# ----------------------------------------------------------------------------- the run, step by step


@dataclass
class Prompts:
    ids: list[list[int]]  # inference-prompt token ids of the training prompts
    rows: list[dict]  # their data rows (the rule reward reads them)
    eval_rows: list[dict]
    report: DataReport
    eval_ids: list[list[int]]  # the first ppo.eval_prompts distinct held-out prompts (held-out rollouts)
    eval_report: DataReport | None = None


def load_prompts(recipe: Recipe, tokenizer, template) -> Prompts:
    s = recipe.ppo
    train_rows, eval_rows, report, eval_report = train_eval_rows(s.data, recipe, recipe.seed, to_prompt)
    ids, kept = tokenize_prompts(
        train_rows, tokenizer, template, s.max_prompt_length, report, "train", unique=s.unique_prompts
    )
    episodes = s.rollout_batch_size * distributed.world_size()
    if episodes > len(ids):
        raise RecipeError(
            f"{recipe.source}: ppo.rollout_batch_size: {s.rollout_batch_size} prompts per update"
            + (f" on each of {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
            + f" is more than the {len(ids)} distinct training prompts, so every update would answer some prompts "
            f"twice; lower it to at most {len(ids) // distributed.world_size()}, or add prompts"
        )
    eval_ids = []
    if s.eval_prompts:
        # the held-out rollouts' prompts (distinct, short enough): a diagnostic with its own report, since every
        # held-out row stays in use for held-out correctness; none usable skips the rollouts, not the stage
        try:
            eval_ids, _ = tokenize_prompts(
                eval_rows, tokenizer, template, s.max_prompt_length, DataReport(), "eval (held-out rollouts)", True
            )
        except DataError as e:
            log.warning("held-out rollouts skipped: %s", e)
    return Prompts(ids, [train_rows[i] for i in kept], eval_rows, report, eval_ids[: s.eval_prompts], eval_report)


def held_out_rollouts(recipe: Recipe, engine: PPOEngine, scorer: Scorer, prompts: Prompts) -> dict:
    """The policy on held-out prompts (engine.held_out): raw learned reward, KL, EOS rate, length."""
    if not prompts.eval_ids:
        return {}
    s, figures = recipe.ppo, []
    reward = scorer.learned if engine.model.reward_head is not None else None
    for i in range(0, len(prompts.eval_ids), s.rollout_batch_size):
        ids, mask = left_pad(prompts.eval_ids[i : i + s.rollout_batch_size], engine.pad_id)
        part = engine.held_out(ids.to(engine.device), mask.to(engine.device), reward, seed=recipe.seed + i)
        figures.append((len(ids), part))
    n = sum(k for k, _ in figures)
    return {
        key: None if figures[0][1][key] is None else sum(k * f[key] for k, f in figures) / n for key in figures[0][1]
    }


def build_policy_model(recipe: Recipe, shared: list[str], policy_from, reward_from, device) -> MultiAdapterModel:
    """One frozen base (the shared chain merged in) with the policy, value and reward adapters."""
    from peft import LoraConfig, TaskType

    base = load_model(recipe, merge=shared).to(device)
    policy_config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=0.0,
        target_modules=lora_targets(recipe, base.config.model_type),
        task_type=TaskType.CAUSAL_LM,
    )
    model = build_model(base, policy_config, policy_from, reward_from, recipe.ppo.value_init)
    trainable = sum(p.numel() for p in model.policy_parameters() + model.value_parameters())
    log.info(
        "one base, adapters %s; %d trainable parameters (policy + value + value head); reference = %s",
        list(model.peft.peft_config),
        trainable,
        f"frozen copy of {policy_from}" if policy_from else "the base with adapters disabled",
    )
    return model


def choose_start(recipe: Recipe, prompts: Prompts, start: tuple) -> Path | None:
    """The checkpoint to continue from (finetune.core.resume's rules: the newest complete one of the same
    run: base, template, LoRA, start adapters, prompts and settings), decided before the model loads."""
    shared, policy_from, reward_from = start
    identity = run_identity(recipe, "ppo", prompts.rows, [*shared, policy_from, reward_from])
    return choose_checkpoint(
        recipe,
        "ppo",
        recipe.ppo.resume,
        identity,
        prefix=checkpoints.PREFIX,
        problem=checkpoints.problem,
        beyond=checkpoints.beyond(recipe.ppo.updates),
    )


def resume_or_start(recipe: Recipe, last: Path | None, model, engine, scorer) -> tuple[int, list[dict], Path]:
    """(first update to run, the update log so far, the log file): continue from checkpoint `last` (see
    choose_start), else start the run's log afresh."""
    s, root = recipe.ppo, recipe.checkpoint_dir("ppo")
    log_file = root / "updates.jsonl"
    start_update, history = 0, []
    if last:
        start_update, scorer.norm = checkpoints.load(last, model, engine)
        log.info("resuming PPO from %s (update %d of %d)", last, start_update, s.updates)
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if last and log_file.is_file():
            history = [r for r in _log_rows(log_file) if r["update"] <= start_update]
        log_file.write_text("".join(json.dumps(r) + "\n" for r in history))
    if not last:
        from transformers import set_seed

        set_seed(recipe.seed + distributed.rank())  # each process samples its own responses
    return start_update, history, log_file


def _log_rows(log_file: Path) -> list[dict]:
    """The rows of updates.jsonl; a last line cut short by a kill mid-append is left out."""
    rows = []
    for line in log_file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def train_updates(
    recipe: Recipe,
    engine: PPOEngine,
    scorer: Scorer,
    model,
    prompts: Prompts,
    start_update: int,
    history: list[dict],
    log_file: Path,
) -> float:
    """Run updates start_update..ppo.updates (rollout, score, optimise), logging each and checkpointing
    every `ppo.save_every`; returns the seconds spent. Progress and the per-update lines have the shape of
    the other stages' (finetune.core.progress), one update being one step."""
    s, main = recipe.ppo, distributed.is_main()
    started = time.time()
    bar = progress("ppo training", total=s.updates, initial=start_update, unit="updates", announce=True, enabled=main)
    for update in range(start_update, s.updates):
        idx = prompt_indices(
            len(prompts.ids), s.rollout_batch_size, update, distributed.rank(), distributed.world_size(), recipe.seed
        )
        ids, mask = left_pad([prompts.ids[i] for i in idx], engine.pad_id)
        stats = engine.step(ids.to(engine.device), mask.to(engine.device), rows=[prompts.rows[i] for i in idx])
        stats = {"update": update + 1, **stats, "lr": engine.policy_opt.param_groups[0]["lr"]}
        bar.update(1, score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}")
        if main:
            history.append(stats)
            tracking.current().log(tracking.ppo_names(stats), step=stats["update"])
            with log_file.open("a") as fh:
                fh.write(json.dumps(stats) + "\n")
            if (update + 1) % recipe.logging.logging_steps == 0 or update + 1 == s.updates:
                bar.write(step_line("ppo", update + 1, s.updates, ppo_figures(stats)))
                if recipe.logging.verbose:
                    bar.write(str(stats))
        if (update + 1) % s.save_every == 0 or update + 1 == s.updates:
            checkpoints.save(recipe.checkpoint_dir("ppo"), update + 1, model, engine, scorer.norm)
    bar.close()
    return time.time() - started


def ppo_figures(stats: dict) -> dict:
    """What a PPO step line shows, in the order of the other stages' lines: losses, lr, then PPO's figures."""
    return {
        "loss": stats["policy_loss"],
        "value loss": stats["value_loss"],
        "lr": f"{stats['lr']:.2e}",
        "score": stats["score"],
        "kl": stats["kl"],
        "len": stats["response_length"],
        "eos": stats["eos_rate"],
        "clipfrac": stats["clipfrac"],
    }


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _window_mean(log_rows: list[dict], key: str, last: bool) -> float | None:
    """Mean of `key` over the first (or last) 10% of updates."""
    values = [r[key] for r in log_rows if key in r]
    if not values:
        return None
    k = max(1, round(len(values) * 0.1))
    part = values[-k:] if last else values[:k]
    return sum(part) / len(part)


def _earlier_correctness(recipe: Recipe) -> dict:
    """Held-out correctness of the earlier chat-model stages' outputs that measure it, for the summary."""
    out = {}
    earlier = STAGES.names()[: STAGES.names().index("ppo")]
    for stage in (s for s in STAGES.chat_model_stages() if s in earlier):
        correct = STAGES.correctness_after(stage, read_metrics(recipe.stage_dir(stage)))
        if correct is not None:
            out[f"correct_rate_{stage}"] = correct
    return out


def collect_metrics(
    recipe: Recipe,
    history: list[dict],
    start_update: int,
    runtime: float,
    engine: PPOEngine,
    scorer: Scorer,
    prompts: Prompts,
    correct: tuple,
    fingerprints: tuple,
    start: tuple,
    in_sync: bool,
) -> dict:
    s = recipe.ppo
    ran = [r for r in history if r["update"] > start_update]
    busy = sum(r["time_generate_s"] + r["time_score_s"] + r["time_optimise_s"] for r in ran)
    gen_share = sum(r["time_generate_s"] for r in ran) / max(busy, 1e-9) if ran else None
    shared, policy_from, reward_from = start
    return {
        "updates": len(history),
        "score_start": _window_mean(history, "score", last=False),
        "score_end": _window_mean(history, "score", last=True),
        "kl_end": _window_mean(history, "kl", last=True),
        "eos_rate_end": _window_mean(history, "eos_rate", last=True),
        **{
            f"{part}_{edge}": _window_mean(history, part, last=edge == "end")
            for part in ("score_learned_raw", "score_rule")
            for edge in ("start", "end")
        },
        "response_length_end": _window_mean(history, "response_length", last=True),
        "correct_rate_before": correct[0],
        "correct_rate_after": correct[1],
        **_earlier_correctness(recipe),
        "train_runtime_s": runtime,
        "seconds_per_update": runtime / len(ran) if ran else None,
        "generation_share": gen_share,
        "peak_memory_mb": _peak_memory_mb(engine.device),
        "resumed_from_update": start_update or None,
        "base_fingerprint": fingerprints[0],
        "base_unchanged": fingerprints[0] == fingerprints[1],
        "adapters_in_sync": in_sync,
        "start_from": shared,
        "policy_initialised_from": policy_from,
        "reward_from": reward_from,
        "reward_function": s.reward_function,
        "rewards": scorer.terms(),
        **{
            f"{part}_{edge}": _window_mean(history, part, last=edge == "end")
            for part in sorted({k for r in history for k in r if k.startswith("reward_")})
            for edge in ("start", "end")
        },
        "reward_normalisation": scorer.norm,
        "beta_end": engine.beta,
        "train_prompts": len(prompts.ids),
        "dropped_overlong_prompts": prompts.report.dropped_overlong,
        "repeated_prompts": prompts.report.repeated_prompts,
        "processes": distributed.world_size(),
    }


def save_output(
    out: Path,
    model,
    tokenizer,
    recipe: Recipe,
    metrics: dict,
    log_file: Path,
    *,
    samples: list[dict] | None = None,
    reports: dict | None = None,
) -> None:
    """`<output_dir>/ppo/`: the policy adapter at the top (a plain PEFT folder), the value adapter and
    head under value/, tokenizer + template, recipe.yaml, metrics.json, updates.jsonl."""
    from safetensors.torch import save_file

    kind = stage_kind("ppo")
    tmp = staging_dir(out, kind)
    try:
        model.peft.save_pretrained(str(tmp), selected_adapters=[POLICY, VALUE])
        for f in (tmp / POLICY).iterdir():
            f.rename(tmp / f.name)
        (tmp / POLICY).rmdir()
        head = {k: v.detach().contiguous().cpu() for k, v in model.value_head.state_dict().items()}
        save_file(head, str(tmp / VALUE / "value_head.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy(log_file, tmp / "updates.jsonl")
        write_stage_files(tmp, recipe, metrics, samples=samples, reports=reports)
        commit_dir(tmp, out, kind)
    finally:
        discard(tmp)


def _term_lines(m: dict) -> list[tuple[str, str]]:
    """One summary line per reward term (first -> last 10% of updates, unweighted) when there are several."""
    if len(m["rewards"]) < 2:
        return []
    lines = []
    for t in m["rewards"]:
        start, end = m.get(f"reward_{t['term']}_start"), m.get(f"reward_{t['term']}_end")
        if start is not None:
            lines.append((f"reward term {t['term']} (x{t['weight']:g})", f"{start:.3f} -> {end:.3f}"))
    return lines


def summarise(metrics: dict, engine: PPOEngine, recipe: Recipe, replies: list[str] | None, out: Path) -> None:
    earlier = ", ".join(f"{k.split('_')[-1].upper()} {rate(v)}" for k, v in _earlier_correctness(recipe).items())
    m = metrics
    print_summary(
        STAGES["ppo"].summary_title,
        [
            ("score (first -> last 10%)", f"{m['score_start']:.3f} -> {m['score_end']:.3f}"),
            *(
                [("learned reward (raw)", f"{m['score_learned_raw_start']:.3f} -> {m['score_learned_raw_end']:.3f}")]
                if m["score_learned_raw_start"] is not None
                else []
            ),
            *_term_lines(m),
            ("KL at the end", f"{m['kl_end']:.3f} nats/response (beta {engine.beta:.3g})"),
            ("EOS rate at the end", rate(m["eos_rate_end"])),
            *(
                [
                    (
                        f"held-out ({m['eval_prompts']} prompts)",
                        f"reward {figure(m['eval_score_before'])} -> {figure(m['eval_score_after'])}, "
                        f"KL {figure(m['eval_kl_after'])}, EOS {rate(m['eval_eos_rate_before'])} -> "
                        f"{rate(m['eval_eos_rate_after'])}, length {m['eval_response_length_before']:.1f} -> "
                        f"{m['eval_response_length_after']:.1f}",
                    )
                ]
                if m.get("eval_kl_after") is not None
                else []
            ),
            (
                "held-out correct",
                f"{rate(m['correct_rate_before'])} -> {rate(m['correct_rate_after'])}"
                + (f" (earlier stages: {earlier})" if earlier else ""),
            ),
            (
                "updates",
                f"{m['updates']} x {recipe.ppo.rollout_batch_size * m['processes']} episodes, "
                f"{m['train_runtime_s']:.1f}s ({rate(m['generation_share'])} generating), "
                f"peak memory {m['peak_memory_mb']:.0f} MB",
            ),
            ("base unchanged", str(m["base_unchanged"])),
            ("sample reply", repr(replies[0]) if replies else "n/a"),
            ("output", str(out)),
        ],
    )


def check_settings(recipe: Recipe, main: bool) -> None:
    """What the ppo section's values must satisfy together, before anything loads."""
    s = recipe.ppo
    if recipe.deepspeed and main:
        log.info(
            "ppo: the DeepSpeed config is not used by this stage: adapters are trained with plain data "
            "parallel (all-reduced gradients) over one shared frozen base; see docs/ppo.md"
        )
    if s.rollout_batch_size % s.mini_batches:
        raise RecipeError(
            f"{recipe.source}: ppo.mini_batches: {s.mini_batches} does not divide "
            f"ppo.rollout_batch_size {s.rollout_batch_size}"
        )


def build_engine(recipe: Recipe, model: MultiAdapterModel, rules, tokenizer, template) -> tuple[Scorer, PPOEngine]:
    """The scorer (learned reward and/or rules) and the PPO engine over the one model."""
    s = recipe.ppo
    scorer = Scorer(
        model,
        rules,
        tokenizer,
        tokenizer.pad_token_id,
        s.normalize_reward,
        s.micro_batch_size,
        learned_weight=learned_weight(recipe, "ppo"),
        response_limit=s.response_length,
    )
    engine = PPOEngine(
        model,
        s,
        scorer,
        end_of_turn_ids(tokenizer, template),
        tokenizer.pad_token_id,
        seed=recipe.seed,
        fp16=recipe.precision == "fp16",
        total_updates=s.updates,
    )
    return scorer, engine


def run(recipe: Recipe) -> dict:
    from accelerate import PartialState
    from transformers import set_seed

    s = recipe.ppo
    check_precision(recipe)
    device = PartialState().device  # also initialises torch.distributed under a launcher
    main = distributed.is_main()
    check_settings(recipe, main)
    start = resolve_start(recipe)
    rules = load_rules(recipe, "ppo")  # imported and their signatures checked before any model loads
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    prompts = load_prompts(recipe, tokenizer, template)
    last = choose_start(recipe, prompts, start)

    model = build_policy_model(recipe, *start, device)
    fingerprint = base_fingerprint(model.peft)
    scorer, engine = build_engine(recipe, model, rules, tokenizer, template)

    def correctness():
        if not main:
            return None, None
        return held_out_correctness(
            model.peft, tokenizer, template, prompts.eval_rows, s.eval_generate_rows, s.max_new_tokens
        )

    # the start's figures before a checkpoint is loaded, so a resumed run reports the same "before" as an
    # unbroken one (none of these touches the training RNG: greedy, or sampled under a forked seed)
    correct_before, _ = correctness()
    held_before = held_out_rollouts(recipe, engine, scorer, prompts) if main else {}
    samples = Samples(recipe, None if main else [])  # the main process generates and saves them
    samples.answer("start", model.peft, tokenizer, template)  # the policy's start: the DPO model
    start_update, history, log_file = resume_or_start(recipe, last, model, engine, scorer)
    runtime = train_updates(recipe, engine, scorer, model, prompts, start_update, history, log_file)
    correct_after, replies = correctness()
    held_after = held_out_rollouts(recipe, engine, scorer, prompts) if main else {}
    samples.answer("ppo", model.peft, tokenizer, template)

    metrics = collect_metrics(
        recipe,
        history,
        start_update,
        runtime,
        engine,
        scorer,
        prompts,
        (correct_before, correct_after),
        (fingerprint, base_fingerprint(model.peft)),
        start,
        adapters_in_sync(model),
    )
    metrics.update(
        {
            f"eval_{k}_{edge}": v
            for edge, fig in (("before", held_before), ("after", held_after))
            for k, v in fig.items()
        }
    )
    metrics["eval_prompts"] = len(prompts.eval_ids)
    out = recipe.stage_dir("ppo")
    if main:
        reports = {"train": prompts.report, "eval": prompts.eval_report}
        save_output(out, model, tokenizer, recipe, metrics, log_file, samples=samples.rows(), reports=reports)
        summarise(metrics, engine, recipe, replies, out)
    distributed.barrier()
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("ppo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
