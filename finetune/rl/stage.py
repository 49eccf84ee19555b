"""What the RL stages (ppo, grpo) share around their engines: where the policy and the reward model start,
the prompts, building the one-base model, resume, the update loop with its log and checkpoints, held-out
rollouts, the common metrics and the output folder. Each function takes the stage's name; the stage modules
(finetune/ppo.py, finetune/grpo.py) add only what is their own."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.core import distributed, lineage, stopping, tracking
from finetune.core.batching import left_pad
from finetune.core.data import DataError, DataReport, to_prompt, tokenize_prompts, train_eval_rows
from finetune.core.lineage import adapter_chain, check_adapter_folder, start_chain
from finetune.core.modeling import load_model, lora_config
from finetune.core.outputs import commit_dir, discard, read_metrics, staging_dir, write_stage_files
from finetune.core.ownership import stage_kind
from finetune.core.progress import progress, step_line
from finetune.core.resume import choose_checkpoint, run_identity
from finetune.recipe import STAGES, Recipe, RecipeError

from . import checkpoints
from .engine import POLICY, VALUE, MultiAdapterModel, RolloutEngine, build_model
from .functional import prompt_indices
from .rules import learned_weight
from .scoring import Scorer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- where things start


def resolve_start(recipe: Recipe, stage: str) -> tuple[list[str], str | None, str | None]:
    """(adapters merged into the shared base, policy adapter to copy or None, reward adapter or None).

    The reward model only scores correctly on the base it was trained on, so the shared base is the
    reward model's own start (normally the SFT output). The policy's chain must begin with it; what
    follows (normally the DPO adapter) becomes the trainable policy, a frozen copy the reference.
    """
    terms = recipe.section(stage).reward_terms()
    if not terms:  # before anything else is looked at: no earlier output makes up for it
        raise RecipeError(
            f"{recipe.source}: {stage} has no reward ({stage}.reward_from is none and no {stage}.reward_function is "
            f"set): name a rule function ({stage}.rewards: [{{function: finetune.rl.rewards:exact_answer}}], any "
            "module:function) and/or the learned reward ({model: <output_dir>/reward}, after `finetune reward`)"
        )
    policy_chain = start_chain(recipe, stage, "start_from")
    reward_dir = recipe.input_dir(stage, "reward_from")
    if reward_dir is None:  # no reward adapter to share a base with: merge the whole policy chain, fresh LoRA
        return policy_chain, None, None
    reward_key = next(f"{stage}.{k}" for k, t in terms if t.function is None)  # rewards[i] or the older reward_from
    reward = str(
        check_adapter_folder(
            recipe,
            reward_key,
            reward_dir,
            f"run `finetune reward {recipe.source}` first, or use only rule rewards ({stage}.rewards: "
            "[{function: module:name}])",
        )
    )
    shared = adapter_chain(reward)[:-1]  # what the reward model was trained on top of

    def same(chain: list[str]) -> list[Path]:  # a relative output_dir spells the folders the recipe names relatively
        return [Path(p).resolve() for p in chain]

    if same(policy_chain[: len(shared)]) != same(shared) or len(policy_chain) - len(shared) > 1:
        raise RecipeError(
            f"{recipe.source}: {stage}: the policy ({' + '.join(policy_chain) or 'the base'}) and the reward model "
            f"(trained on {' + '.join(shared) or 'the base'}) must share their base: the policy may add at most one "
            "adapter (e.g. DPO) on top of what the reward model was trained on. Train the reward model from the "
            f"same SFT output (reward.start_from) or start {stage} from it ({stage}.start_from)"
        )
    rest = policy_chain[len(shared) :]
    for key, folder in ((f"{stage}.start_from", rest[0] if rest else None), (reward_key, reward)):
        saved = fully_trained_modules(folder) if folder else []
        if saved:
            raise RecipeError(
                f"{recipe.source}: {key}: {folder} also trained {saved} in full (lora.modules_to_save), which the "
                "shared base of the RL stages cannot hold per adapter; train that stage without modules_to_save, or "
                "start from an adapter that is merged into the base (the one the reward model was trained on)"
            )
    return shared, (rest[0] if rest else None), reward


def fully_trained_modules(folder: str) -> list[str]:
    """The modules an adapter saved in full besides a score head (PEFT adds that one to modules_to_save)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return [m for m in config.get("modules_to_save") or [] if m not in ("score", "classifier")]


# ----------------------------------------------------------------------------- prompts


@dataclass
class Prompts:
    ids: list[list[int]]  # inference-prompt token ids of the training prompts
    rows: list[dict]  # their data rows (the rule reward reads them)
    eval_rows: list[dict]
    report: DataReport
    eval_ids: list[list[int]]  # the first <stage>.eval_prompts distinct held-out prompts (held-out rollouts)
    eval_report: DataReport | None = None


def load_prompts(recipe: Recipe, stage: str, tokenizer, template) -> Prompts:
    s = recipe.section(stage)
    train_rows, eval_rows, report, eval_report = train_eval_rows(s.data, recipe, recipe.seed, to_prompt)
    ids, kept = tokenize_prompts(
        train_rows, tokenizer, template, s.max_prompt_length, report, "train", unique=s.unique_prompts
    )
    episodes = s.rollout_batch_size * distributed.world_size()
    if episodes > len(ids):
        raise RecipeError(
            f"{recipe.source}: {stage}.rollout_batch_size: {s.rollout_batch_size} prompts per update"
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


def held_out_rollouts(recipe: Recipe, stage: str, engine: RolloutEngine, scorer, prompts: Prompts) -> dict:
    """The policy on held-out prompts (engine.held_out): raw learned reward, KL, EOS rate, length."""
    if not prompts.eval_ids:
        return {}
    s, figures = recipe.section(stage), []
    reward = scorer.learned if engine.model.reward_head is not None else None
    for i in range(0, len(prompts.eval_ids), s.rollout_batch_size):
        ids, mask = left_pad(prompts.eval_ids[i : i + s.rollout_batch_size], engine.pad_id)
        part = engine.held_out(ids.to(engine.device), mask.to(engine.device), reward, seed=recipe.seed + i)
        figures.append((len(ids), part))
    n = sum(k for k, _ in figures)
    return {
        key: None if figures[0][1][key] is None else sum(k * f[key] for k, f in figures) / n for key in figures[0][1]
    }


# ----------------------------------------------------------------------------- the model


def build_policy_model(
    recipe: Recipe, shared: list[str], policy_from, reward_from, device, value_init: str | None
) -> MultiAdapterModel:
    """One frozen base (the shared chain merged in) with the policy, reward and (PPO) value adapters."""
    base = load_model(recipe, merge=shared)
    if not recipe.model.load_in_4bit:  # a 4-bit base is placed by its device_map and cannot move
        base = base.to(device)
    policy_config = lora_config(recipe, base.config.model_type, dropout=0.0)
    model = build_model(base, policy_config, policy_from, reward_from, value_init)
    trainable = sum(p.numel() for p in model.policy_parameters() + model.value_parameters())
    log.info(
        "one base, adapters %s; %d trainable parameters (%s); reference = %s",
        list(model.peft.peft_config),
        trainable,
        "policy + value + value head" if model.value_head is not None else "policy",
        f"frozen copy of {policy_from}" if policy_from else "the base with adapters disabled",
    )
    return model


def build_scorer(recipe: Recipe, stage: str, model: MultiAdapterModel, rules: list, tokenizer) -> Scorer:
    """The stage's reward (its `rewards` terms: the rules, loaded by finetune.rl.rules.load_rules, and the learned
    reward's weight) as one scorer; PPO and GRPO score the same way."""
    s = recipe.section(stage)
    return Scorer(
        model,
        rules,
        tokenizer,
        tokenizer.pad_token_id,
        s.normalize_reward,
        s.micro_batch_size,
        learned_weight=learned_weight(recipe, stage),
        response_limit=s.response_length,
    )


# ----------------------------------------------------------------------------- resume


def choose_start(recipe: Recipe, stage: str, prompts: Prompts, start: tuple) -> Path | None:
    """The checkpoint to continue from (finetune.core.resume's rules: the newest complete one of the same
    run: base, template, LoRA, start adapters, prompts and settings), decided before the model loads."""
    shared, policy_from, reward_from = start
    identity = run_identity(recipe, stage, prompts.rows, [*shared, policy_from, reward_from])
    s = recipe.section(stage)
    return choose_checkpoint(
        recipe,
        stage,
        s.resume,
        identity,
        prefix=checkpoints.PREFIX,
        problem=checkpoints.problem,
        beyond=checkpoints.beyond(s.updates, stage),
    )


def resume_or_start(recipe: Recipe, stage: str, last: Path | None, model, engine, scorer) -> tuple[int, list, Path]:
    """(first update to run, the update log so far, the log file): continue from checkpoint `last` (see
    choose_start), else start the run's log afresh."""
    s, root = recipe.section(stage), recipe.checkpoint_dir(stage)
    log_file = root / "updates.jsonl"
    start_update, history = 0, []
    if last:
        start_update, scorer.norm = checkpoints.load(last, model, engine, stage)
        log.info("resuming %s from %s (update %d of %d)", stage, last, start_update, s.updates)
    if distributed.writes_output(root.parent):  # each node with its own output folder keeps its own log
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


# ----------------------------------------------------------------------------- the updates


def train_updates(
    recipe: Recipe,
    stage: str,
    engine: RolloutEngine,
    scorer,
    model,
    prompts: Prompts,
    start_update: int,
    history: list[dict],
    log_file: Path,
    figures,
    bar: dict,
) -> float:
    """Run updates start_update..<stage>.updates (rollout, score, optimise), logging each and checkpointing
    every `save_every`; returns the seconds spent. `figures(stats)` is what a step line shows, `bar` maps
    the progress bar's labels to stats keys. One update is one step of the other stages' progress lines."""
    s, main = recipe.section(stage), distributed.is_main()
    writer = distributed.writes_output(log_file.parent.parent)
    started = time.time()
    meter = progress(
        f"{stage} training", total=s.updates, initial=start_update, unit="updates", announce=True, enabled=main
    )
    with stopping.checkpointable():  # SIGTERM: the loop checkpoints and stops (core.stopping)
        for update in range(start_update, s.updates):
            idx = prompt_indices(
                len(prompts.ids),
                s.rollout_batch_size,
                update,
                distributed.rank(),
                distributed.world_size(),
                recipe.seed,
            )
            ids, mask = left_pad([prompts.ids[i] for i in idx], engine.pad_id)
            stats = engine.step(ids.to(engine.device), mask.to(engine.device), rows=[prompts.rows[i] for i in idx])
            stats = {"update": update + 1, **stats, "lr": engine.policy_opt.param_groups[0]["lr"]}
            meter.update(1, **{label: f"{stats[key]:.3f}" for label, key in bar.items() if key in stats})
            history.append(stats)  # the same on every process (engine.step averages its figures over them)
            if writer:
                with log_file.open("a") as fh:
                    fh.write(json.dumps(stats) + "\n")
            if main:
                tracking.current().log(tracking.rl_names(stats, stage), step=stats["update"])
                if (update + 1) % recipe.logging.logging_steps == 0 or update + 1 == s.updates:
                    meter.write(step_line(stage, update + 1, s.updates, figures(stats)))
                    if recipe.logging.verbose:
                        meter.write(str(stats))
            stop = stopping.stop_now(engine.device)  # SIGTERM: checkpoint this update, then stop
            if stop or (update + 1) % s.save_every == 0 or update + 1 == s.updates:
                checkpoints.save(recipe.checkpoint_dir(stage), update + 1, model, engine, scorer.norm)
            if stop:
                raise stopping.Terminated(f"{stage} saved a checkpoint at update {update + 1}")
    meter.close()
    return time.time() - started


# ----------------------------------------------------------------------------- figures and output


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def window_mean(log_rows: list[dict], key: str, last: bool) -> float | None:
    """Mean of `key` over the first (or last) 10% of updates."""
    values = [r[key] for r in log_rows if key in r]
    if not values:
        return None
    k = max(1, round(len(values) * 0.1))
    part = values[-k:] if last else values[:k]
    return sum(part) / len(part)


def term_lines(metrics: dict) -> list[tuple[str, str]]:
    """One summary line per reward term (first -> last 10% of updates, unweighted) when there are several."""
    if len(metrics["rewards"]) < 2:
        return []
    lines = []
    for t in metrics["rewards"]:
        start, end = metrics.get(f"reward_{t['term']}_start"), metrics.get(f"reward_{t['term']}_end")
        if start is not None:
            lines.append((f"reward term {t['term']} (x{t['weight']:g})", f"{start:.3f} -> {end:.3f}"))
    return lines


def earlier_correctness(recipe: Recipe, stage: str) -> dict:
    """Held-out correctness of the chat-model stages' outputs before `stage` in pipeline order that measure it,
    for the summary."""
    out = {}
    earlier = STAGES.names()[: STAGES.names().index(stage)]
    for name in (s for s in STAGES.chat_model_stages() if s in earlier):
        correct = STAGES.correctness_after(name, read_metrics(recipe.stage_dir(name)))
        if correct is not None:
            out[f"correct_rate_{name}"] = correct
    return out


def common_metrics(
    recipe: Recipe,
    stage: str,
    history: list[dict],
    start_update: int,
    runtime: float,
    engine: RolloutEngine,
    scorer,
    prompts: Prompts,
    correct: tuple,
    fingerprints: tuple,
    start: tuple,
    in_sync: bool,
    held: tuple[dict, dict],
) -> dict:
    """The metrics every RL stage reports: time split, held-out figures before/after, where it started."""
    s = recipe.section(stage)
    ran = [r for r in history if r["update"] > start_update]
    busy = sum(r["time_generate_s"] + r["time_score_s"] + r["time_optimise_s"] for r in ran)
    shared, policy_from, reward_from = start
    return {
        "updates": len(history),
        "eos_rate_end": window_mean(history, "eos_rate", last=True),
        "response_length_end": window_mean(history, "response_length", last=True),
        **{
            f"{part}_{edge}": window_mean(history, part, last=edge == "end")
            for part in ("score_learned_raw", "score_rule")
            for edge in ("start", "end")
        },
        "correct_rate_before": correct[0],
        "correct_rate_after": correct[1],
        **earlier_correctness(recipe, stage),
        "train_runtime_s": runtime,
        "seconds_per_update": runtime / len(ran) if ran else None,
        "generation_share": sum(r["time_generate_s"] for r in ran) / max(busy, 1e-9) if ran else None,
        **{
            f"time_{part}_share": sum(r[f"time_{part}_s"] for r in ran) / max(busy, 1e-9) if ran else None
            for part in ("score", "optimise")
        },
        "peak_memory_mb": peak_memory_mb(engine.device),
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
            f"reward_{t['term']}_{edge}": window_mean(history, f"reward_{t['term']}", last=edge == "end")
            for t in scorer.terms()
            for edge in ("start", "end")
        },
        "reward_normalisation": scorer.norm,
        "train_prompts": len(prompts.ids),
        "dropped_overlong_prompts": prompts.report.dropped_overlong,
        "repeated_prompts": prompts.report.repeated_prompts,
        "processes": distributed.world_size(),
        **{f"eval_{k}_{edge}": v for edge, fig in zip(("before", "after"), held) for k, v in fig.items()},
        "eval_prompts": len(prompts.eval_ids),
    }


def save_output(
    out: Path,
    stage: str,
    model,
    tokenizer,
    recipe: Recipe,
    metrics: dict,
    log_file: Path,
    *,
    samples: list[dict] | None = None,
    reports: dict | None = None,
) -> None:
    """`<output_dir>/<stage>/`: the policy adapter at the top (a plain PEFT folder), PPO's value adapter and
    head under value/, tokenizer + template, recipe.yaml, metrics.json, updates.jsonl."""
    from safetensors.torch import save_file

    kind = stage_kind(stage)
    tmp = staging_dir(out, kind)
    try:
        value = model.value_head is not None
        model.peft.save_pretrained(str(tmp), selected_adapters=[POLICY, VALUE] if value else [POLICY])
        if (tmp / POLICY).is_dir():  # PEFT nests every adapter but "default" in a folder of its name
            for f in (tmp / POLICY).iterdir():
                f.rename(tmp / f.name)
            (tmp / POLICY).rmdir()
        if value:
            head = {k: v.detach().contiguous().cpu() for k, v in model.value_head.state_dict().items()}
            save_file(head, str(tmp / VALUE / "value_head.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy(log_file, tmp / "updates.jsonl")
        stamped = lineage.stamp(recipe, stage, metrics, lineage.upstream(recipe, stage))
        write_stage_files(tmp, recipe, stamped, samples=samples, reports=reports)
        commit_dir(tmp, out, kind)
    finally:
        discard(tmp)


def build_engine(recipe: Recipe, stage: str, engine_class: type[RolloutEngine], model, rules, tokenizer, template):
    """The stage's scorer (learned reward and/or rules) and its engine over the one model, rolling out with vLLM
    when `<stage>.use_vllm`."""
    from finetune.chat_template import end_of_turn_ids

    s = recipe.section(stage)
    scorer = build_scorer(recipe, stage, model, rules, tokenizer)
    engine = engine_class(
        model,
        s,
        scorer,
        end_of_turn_ids(tokenizer, template),
        tokenizer.pad_token_id,
        seed=recipe.seed,
        fp16=recipe.precision == "fp16",
        total_updates=s.updates,
        loraplus_lr_ratio=recipe.lora.loraplus_lr_ratio,
    )
    if s.use_vllm:
        from .vllm_rollout import VllmSampler

        engine.sampler = VllmSampler(recipe, stage, model, tokenizer, engine)
    return scorer, engine


# ----------------------------------------------------------------------------- the stage, start to end


@dataclass
class StageParts:
    """What an RL stage module supplies to `run`: its value adapter (PPO: "reward" or "new"; GRPO: None), its
    engine class, what its step lines and progress bar show, its own metrics
    from the update log, and its closing summary."""

    value_init: str | None
    engine: type[RolloutEngine]  # PPOEngine or GRPOEngine: built over the model by build_engine
    figures: object  # stats -> {label: value} for a step line
    bar: dict  # progress-bar label -> stats key
    own_metrics: object  # (history, engine) -> dict
    summarise: object  # (metrics, engine, recipe, replies, out) -> None
    check_settings: object = None  # (recipe, main) -> None, before anything loads


def run(recipe: Recipe, stage: str, parts: StageParts) -> dict:
    """load recipe -> prompts -> base (with the adapters the policy and reward model share merged in) +
    adapters -> held-out figures before -> updates (rollout, score, optimise; checkpoints, resumable) ->
    held-out figures after -> save the policy adapter -> summary."""
    from accelerate import PartialState
    from transformers import set_seed

    from finetune.core.evaluation import Samples, held_out_correctness
    from finetune.core.modeling import base_fingerprint, load_tokenizer, template_for
    from finetune.core.training import check_precision

    from .engine import adapters_in_sync
    from .rules import load_rules

    s = recipe.section(stage)
    check_precision(recipe)
    device = PartialState().device  # also initialises torch.distributed under a launcher
    main = distributed.is_main()
    distributed.shares_main_folder(recipe.output_path(recipe.output_dir))  # collective: which node writes where
    if recipe.lora.modules_to_save:
        raise RecipeError(
            f"{recipe.source}: lora.modules_to_save: not supported by the {stage} stage, whose adapters share one "
            "base and switch between each other (a fully trained module copy would be shared by all of them); "
            "override lora.modules_to_save=[] for it"
        )
    if recipe.deepspeed and main:
        log.info(
            "%s: the DeepSpeed config is not used by this stage: adapters are trained with plain data parallel "
            "(all-reduced gradients) over one shared frozen base; see docs/ppo.md",
            stage,
        )
    if parts.check_settings is not None:
        parts.check_settings(recipe, main)
    start = resolve_start(recipe, stage)
    rules = load_rules(recipe, stage)  # imported and their signatures checked before any model loads
    set_seed(recipe.seed)
    template, tokenizer = template_for(recipe), load_tokenizer(recipe)
    prompts = load_prompts(recipe, stage, tokenizer, template)
    last = choose_start(recipe, stage, prompts, start)

    model = build_policy_model(recipe, *start, device, parts.value_init)
    fingerprint = base_fingerprint(model.peft)
    scorer, engine = build_engine(recipe, stage, parts.engine, model, rules, tokenizer, template)

    def correctness():
        if not main:
            return None, None
        return held_out_correctness(
            model.peft, tokenizer, template, prompts.eval_rows, s.eval_generate_rows, s.max_new_tokens
        )

    # the start's figures before a checkpoint is loaded, so a resumed run reports the same "before" as an
    # unbroken one (none of these touches the training RNG: greedy, or sampled under a forked seed)
    correct_before, _ = correctness()
    held_before = held_out_rollouts(recipe, stage, engine, scorer, prompts) if main else {}
    samples = Samples(recipe, None if main else [])  # the main process generates and saves them
    samples.answer("start", model.peft, tokenizer, template)  # the policy's start
    start_update, history, log_file = resume_or_start(recipe, stage, last, model, engine, scorer)
    runtime = train_updates(
        recipe, stage, engine, scorer, model, prompts, start_update, history, log_file, parts.figures, parts.bar
    )
    correct_after, replies = correctness()
    held_after = held_out_rollouts(recipe, stage, engine, scorer, prompts) if main else {}
    samples.answer(stage, model.peft, tokenizer, template)

    metrics = {
        **parts.own_metrics(history, engine),
        **common_metrics(
            recipe,
            stage,
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
            (held_before, held_after),
        ),
    }
    out = recipe.stage_dir(stage)
    # every writer (one per node when each node has its own output folder) saves the main process's figures, with
    # its own folders: a node's output names the adapters on that node's disk, never the main node's paths
    local = {key: metrics[key] for key in ("start_from", "policy_initialised_from", "reward_from")}
    metrics, rows = distributed.broadcast_from_main((metrics, samples.rows()))
    metrics = {**metrics, **local}
    if distributed.writes_output(out.parent):
        reports = {"train": prompts.report, "eval": prompts.eval_report}
        save_output(out, stage, model, tokenizer, recipe, metrics, log_file, samples=rows, reports=reports)
    if main:
        parts.summarise(metrics, engine, recipe, replies, out)
    distributed.barrier()
    return metrics
