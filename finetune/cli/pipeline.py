"""The whole recipe in one command: every stage in pipeline order, each in its own process.

    finetune pipeline RECIPE [key=value ...] [--force]

Each stage runs exactly as `finetune <stage> RECIPE [key=value ...]` would launch it (plain python,
or `accelerate launch --config_file <launch.accelerate_config>`; export always plain), with the same
overrides. `pipeline.stages` picks a subset; the order is always the one above.

Continuing after a stop: a stage whose finished output exists (`<output_dir>/<stage>/metrics.json`,
written last inside the atomically renamed folder; the complete export folder) is skipped, and an
unfinished stage resumes from its checkpoints. Once a stage has run, every later stage runs again
from scratch (`<stage>.resume=false`, `export.force=true`): its inputs changed. `--force`
(`pipeline.force=true`) runs everything again.

At the end: one table (stage, key metric before -> after, held-out correctness, time, output), the
same in `<output_dir>/pipeline_report.json`, and every stage's training curves in
`<output_dir>/pipeline_curves.png`. With `logging.report_to` the stages report under one tracker run
(an MLflow parent run, a W&B group: finetune.core.tracking.PipelineRun; docs/tracking.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from finetune.core import progress, tracking
from finetune.core.locks import output_lock
from finetune.core.outputs import finished, read_metrics, write_json
from finetune.core.summary import figure, rate
from finetune.errors import UserError
from finetune.launch import INTERRUPTED, VERBOSE_HELP, ignoring_sigint, recipe_command, run_child, stop_child
from finetune.recipe import STAGES, Recipe, load_recipe
from finetune.rl.rules import load_rules

REPORT = "pipeline_report.json"
CURVES = "pipeline_curves.png"


def report_row(recipe: Recipe, stage: str, status: str, seconds: float | None, earlier: bool = False) -> dict:
    return {
        "stage": stage,
        "status": status,
        **STAGES[stage].key_metrics(read_metrics(recipe.stage_dir(stage))),
        "seconds": seconds,
        "seconds_from_earlier_run": earlier,
        "output": str(recipe.stage_dir(stage)),
    }


def format_table(rows: list[dict]) -> str:
    header = ["stage", "status", "key metric", "before -> after", "held-out correct", "time", "output"]
    lines = []
    for r in rows:
        if r["metric"] is None:
            change = "n/a"
        elif r["before"] is None and r["after"] is not None:  # a figure with no before (export's parity)
            change = figure(r["after"], r["metric"])
        else:
            change = f"{figure(r['before'], r['metric'])} -> {figure(r['after'], r['metric'])}"
        if r.get("note"):  # what the stage adds to its headline (export: the exported dtype's parity)
            change += f" ({r['note']})"
        correct = (
            "n/a"
            if r["correct_before"] is None and r["correct_after"] is None
            else f"{rate(r['correct_before'])} -> {rate(r['correct_after'])}"
        )
        seconds = (
            "-"
            if r["seconds"] is None
            else f"{r['seconds']:.0f}s" + (" (earlier)" if r["seconds_from_earlier_run"] else "")
        )
        lines.append([r["stage"], r["status"], r["metric"] or "n/a", change, correct, seconds, r["output"]])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line).rstrip() for line in [header, ["-" * w for w in widths], *lines])


def plot_curves(recipe: Recipe, stages: list[str], path: Path) -> list[str]:
    """One panel per stage with recorded curves: training loss per step (the TRL stages' log_history.json) and
    score and KL per update (the RL stages' updates.jsonl). Returns the stages drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves = {}
    for stage in stages:
        folder = recipe.stage_dir(stage)
        if (folder / "updates.jsonl").is_file():
            rows = [json.loads(x) for x in (folder / "updates.jsonl").read_text().splitlines() if x.strip()]
            curves[stage] = ("update", {k: [(r["update"], r[k]) for r in rows if k in r] for k in ("score", "kl")})
        elif (folder / "log_history.json").is_file():
            rows = json.loads((folder / "log_history.json").read_text())
            curves[stage] = ("step", {"loss": [(r["step"], r["loss"]) for r in rows if "loss" in r]})
    if not curves:
        return []
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (stage, (xlabel, series)) in zip(axes[0], curves.items()):
        first = True
        for (name, points), color in zip(series.items(), ("tab:blue", "tab:red")):
            target = ax if first else ax.twinx()
            if points:
                target.plot(*zip(*points), color=color, label=name)
            target.set_ylabel(name, color=color)
            first = False
        ax.set_title(stage)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return list(curves)


def _earlier_seconds(report: Path) -> dict:
    if not report.is_file():
        return {}
    try:
        rows = json.loads(report.read_text()).get("stages", [])
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {r["stage"]: r["seconds"] for r in rows if r.get("seconds") is not None}


def stage_overrides(recipe: Recipe, stage: str, trained: list[str], rerun: bool) -> list[str]:
    """What the pipeline adds to a stage's command: a stage that takes a chat model (export) takes this
    pipeline's, and once an earlier stage has run, later ones start over (their inputs changed)."""
    extra = []
    entry, section = STAGES[stage], recipe.section(stage)
    chat_choice = entry.model_choice and not any(STAGES[s].takes_models for s in STAGES.inputs(stage))
    if chat_choice and getattr(section, entry.model_choice) == "auto" and trained:
        # this pipeline's model, not an older stage's output (a stage that may also take the export, eval,
        # keeps auto: it prefers the export this pipeline just wrote)
        extra.append(f"{stage}.{entry.model_choice}={trained[-1]}")
    if rerun:  # an earlier stage changed this one's inputs: start over, replace the output
        keys = type(section).model_fields
        extra += [f"{stage}.resume=false"] if "resume" in keys else [f"{stage}.force=true"] if "force" in keys else []
    return extra


def _sources(section) -> str:
    def one(s):
        return (
            f"{s.path}[{s.split}]"
            + (f" x{s.weight:g}" if s.weight != 1 else "")
            + (f" ({s.format})" if s.format != "auto" else "")
        )

    data = section.data
    held = ", ".join(map(one, data.eval)) if data.eval else f"{data.eval_fraction:.0%} of train held out"
    cap = f", at most {data.max_eval_rows} rows" if data.max_eval_rows else ""
    return f"train {', '.join(map(one, data.train))}; eval {held}{cap}"


def _steps_and_tokens(recipe: Recipe, stage: str, processes: int) -> tuple[str, str]:
    """Optimiser steps and tokens, from the recipe alone (data sizes are not known before the data is read);
    the stage's registry entry says what a row is and what the stage holds."""
    entry, section = STAGES[stage], recipe.section(stage)
    m = entry.memory
    if m.rollout:
        generations = getattr(section, "num_generations", 1)
        prompts = section.rollout_batch_size * processes
        episodes = prompts * generations
        per_prompt = f" x {generations} samples" if generations > 1 else ""
        return (
            f"{section.updates} updates x {episodes} episodes ({section.rollout_batch_size} prompts{per_prompt} x "
            f"{processes} processes), {getattr(section, 'ppo_epochs', 1)} epochs x {section.mini_batches} "
            "minibatches each",
            f"at most {episodes * (section.max_prompt_length + section.response_length):,} per update "
            f"(prompts <= {section.max_prompt_length}, responses <= {section.response_length})",
        )
    if entry.trl_config is None:  # merges, benchmarks: no trainer
        tasks = getattr(section, "tasks", None)
        names = f": {', '.join(t.name for t in tasks)}" if tasks else ""
        return f"no training{names}", "as the tasks need" if tasks else "parity and sample prompts only"

    def setting(name):
        return recipe.trl_setting(stage, name, processes)

    batch, accumulate, length = (
        setting("per_device_train_batch_size"),
        setting("gradient_accumulation_steps"),
        setting("max_length"),
    )
    rows = batch * accumulate * processes
    max_steps, epochs = setting("max_steps"), setting("num_train_epochs")
    steps = (
        f"{max_steps}"
        if max_steps and max_steps > 0
        else f"unknown until the data is read: {epochs:g} epoch(s) over the rows read"
    )
    packed = " (packed)" if setting("packing") else ""
    sequences = f", {m.sequences} sequences each" if m.sequences > 1 else ""
    return (
        f"{steps}; {rows} {entry.unit}{packed} per step ({batch} x {accumulate} accumulated x {processes} processes)",
        f"at most {rows * m.sequences * length:,} per step ({entry.unit} of <= {length} tokens{sequences})",
    )


def plan(recipe_path: str, overrides: list[str]) -> int:
    """`finetune pipeline RECIPE --plan`: each stage's data, steps, tokens, memory estimate and command,
    from the recipe alone: no model, no data loaded (the model's shape comes from its config)."""
    from finetune.core.memory import (
        GIB,
        estimate_stage,
        host_available_bytes,
        model_shape,
        planned_device,
        planned_processes,
        stage_settings,
    )

    recipe = load_recipe(recipe_path, overrides)
    stages = recipe.pipeline_stages()
    device = planned_device(recipe)
    shape, source = model_shape(recipe)
    trained = [s for s in stages if STAGES[s].chat_model]
    lines = [f"== plan: {recipe_path} ({len(stages)} stages; nothing loaded) =="]
    if shape is None:
        lines.append(f"model: {recipe.model.name_or_path} (no estimate: {source})")
    else:
        lines.append(
            f"model: {recipe.model.name_or_path}, {shape.params / 1e9:.2f}B parameters ({source}); LoRA r="
            f"{recipe.lora.r}: {shape.lora_params / 1e6:.1f}M parameters per adapter; {recipe.precision}"
        )
    lines.append(
        f"this machine: {host_available_bytes() / GIB:.1f} GiB RAM available"
        + (", planning for GPUs" if device == "cuda" else ", planning for the CPU")
    )
    for i, stage in enumerate(stages, 1):
        processes = planned_processes(recipe, stage)
        where = "cpu" if STAGES[stage].memory.merge_only else device
        steps, tokens = _steps_and_tokens(recipe, stage, processes)
        lines.append(f"\n[{i}/{len(stages)}] {stage}")
        if STAGES[stage].has_data:
            lines.append(f"  data:     {_sources(recipe.section(stage))}")
        lines.append(f"  steps:    {steps}")
        lines.append(f"  tokens:   {tokens}")
        if shape is not None:
            est = estimate_stage(stage, shape, stage_settings(recipe, stage, where, processes))
            unit = (
                "per GPU"
                if est.device == "cuda"
                else "of RAM" + (f" per process, x{processes}" if processes > 1 else "")
            )
            host = (
                f"; host RAM while loading {est.host_gib:.1f} GiB per process x {processes}"
                if est.device == "cuda"
                else ""
            )
            lines.append(f"  memory:   ~{est.total_gib:.1f} GiB {unit} ({est.breakdown()}){host}")
        cmd = recipe_command(recipe, recipe_path, stage, [*overrides, *stage_overrides(recipe, stage, trained, False)])
        lines.append(f"  command:  {' '.join(cmd)}")
    lines.append(
        "\nEstimates, not measurements (docs/memory.md); each stage checks again, on the machine it runs on, "
        "before it loads anything."
    )
    print("\n".join(lines))
    return 0


def _pump(source, target, last: list[float]) -> None:
    for line in source:
        last[0] = time.monotonic()
        target.write(line)
        target.flush()


def run_stage_process(cmd: list[str], label: str, env: dict | None = None) -> int:
    """Run one stage's process and return its exit status.

    At a terminal the stage writes to it directly (its progress bars). Elsewhere (a log file, CI, a
    pipe) its output passes through here line by line, stdout and stderr kept apart, and when it has
    been quiet for longer than its own progress lines would be (a stage process importing torch on a
    busy machine, a phase that reports nothing) a line says it is still running: the log never goes
    silent for long."""
    if progress.mode() == "bar":
        return run_child(cmd, env=env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    last, started = [time.monotonic()], time.monotonic()
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, last), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, last), daemon=True),
    ]
    for t in pumps:
        t.start()
    # longer than the stage's own progress interval, so a stage that reports is never talked over
    patience = 1.5 * progress.interval()
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if time.monotonic() - last[0] >= patience:
                progress.emit(f"{label}: running, {progress.duration(time.monotonic() - started)} elapsed")
                last[0] = time.monotonic()
    except KeyboardInterrupt:  # let the stage stop cleanly (its own Ctrl-C message), then say so here
        stop_child(proc)
        raise
    finally:
        if proc.poll() is None:  # interrupted here: stop the stage too
            proc.terminate()
        proc.wait()
        for t in pumps:
            t.join()
    return proc.returncode


def run(recipe_path: str, overrides: list[str], force: bool = False) -> int:
    """Run the recipe's stages in order (skipping finished ones); print and write the report. Returns
    the exit status: 0, that of the first stage that failed, or 130 when interrupted (Ctrl-C). One
    pipeline per output_dir at a time (a lock file; each stage also takes its own)."""
    recipe = load_recipe(recipe_path, overrides)
    with output_lock(
        recipe.output_path(recipe.output_dir),
        "pipeline",
        "a pipeline",
        "wait for it to finish, stop it, or set output_dir to another folder",
    ):
        return _run(recipe, recipe_path, overrides, force)


def check_requirements(recipe: Recipe, stages: list[str]) -> None:
    """Refuse before any stage runs when a stage's optional library is missing (not after an hour of
    training): name the stage, the install command and how to leave the stage out."""
    missing = STAGES.missing_libraries(stages)
    if missing:
        others = [s for s in stages if not STAGES[s].missing()]
        raise UserError(
            f"{recipe.source}: {'; '.join(missing)}. Install it, or leave the stage out with "
            f"pipeline.stages=[{', '.join(others)}]. Nothing was run."
        )
    for stage in stages:  # the RL stages' rule rewards: a misnamed or mis-shaped function stops here too
        if hasattr(recipe.section(stage), "reward_terms"):
            load_rules(recipe, stage)


def _run(recipe: Recipe, recipe_path: str, overrides: list[str], force: bool) -> int:
    stages = recipe.pipeline_stages()
    check_requirements(recipe, stages)
    out = Path(recipe.output_dir)
    report_path = out / REPORT
    earlier = _earlier_seconds(report_path)
    trained = [s for s in stages if STAGES[s].chat_model]
    rerun = force or recipe.pipeline.force
    rows, failed, started = [], None, time.time()
    tracked = tracking.PipelineRun(recipe)  # one parent run / group for the stages' tracker runs
    env = {**os.environ, **tracked.env}

    def write_report(curves: str | None = None) -> dict:
        # after every stage too: a pipeline killed later still leaves the times of what it finished
        report = {
            "recipe": str(recipe_path),
            "overrides": overrides,
            "output_dir": str(out),
            "stages": rows,
            "seconds": time.time() - started,
            "curves": curves,
            "complete": failed is None and len(rows) == len(stages),
        }
        write_json(report_path, report)
        return report

    for i, stage in enumerate(stages, 1):
        where = recipe.stage_dir(stage)
        if finished(recipe, stage) and not rerun:
            print(f"== pipeline [{i}/{len(stages)}] {stage}: skipped (finished output in {where})", file=sys.stderr)
            rows.append(report_row(recipe, stage, "skipped", earlier.get(stage), earlier=stage in earlier))
            continue
        cmd = recipe_command(recipe, recipe_path, stage, [*overrides, *stage_overrides(recipe, stage, trained, rerun)])
        print(f"== pipeline [{i}/{len(stages)}] {stage}: running\n+ {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            code = run_stage_process(cmd, f"pipeline [{i}/{len(stages)}] {stage}", env=env)
        except KeyboardInterrupt:
            code = INTERRUPTED
        seconds = time.time() - t0
        if code == INTERRUPTED:
            rows.append(report_row(recipe, stage, "interrupted", seconds))
            failed = (stage, code)
            break
        if code != 0:
            code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
            rows.append(report_row(recipe, stage, f"failed (exit {code})", seconds))
            failed = (stage, code)
            break
        rows.append(report_row(recipe, stage, "ran", seconds))
        write_report()
        rerun = True
    interrupted = failed is not None and failed[1] == INTERRUPTED
    with ignoring_sigint() if interrupted else contextlib.nullcontext():  # the report is written whole
        drawn = plot_curves(recipe, [r["stage"] for r in rows], out / CURVES)
        report = write_report(str(out / CURVES) if drawn else None)
        tracked.finish(report_path, failed is not None, out / CURVES if drawn else None)
    if failed is None:
        title = "pipeline done"
    elif interrupted:
        title = f"pipeline interrupted (Ctrl-C) during {failed[0]}"
    else:
        title = f"pipeline stopped: {failed[0]} failed (exit {failed[1]})"
    print(f"\n== {title} ({report['seconds']:.0f}s) ==\n{format_table(rows)}")
    print(f"report: {report_path}" + (f"\ncurves: {out / CURVES}" if drawn else ""))
    if interrupted:
        print("finetune pipeline: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
    elif failed:
        print(
            f"fix the {failed[0]} error above and rerun the same command: finished stages are skipped", file=sys.stderr
        )
    return 0 if failed is None else failed[1]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="finetune pipeline", description="Run every stage of a recipe in order.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_chat.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides passed to every stage")
    parser.add_argument("--force", action="store_true", help="run every stage again even if its output exists")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's data, steps, tokens, memory estimate and command; load and run nothing",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.plan:
            return plan(args.recipe, args.overrides)
        return run(args.recipe, args.overrides + (["logging.verbose=true"] if args.verbose else []), args.force)
    except UserError as e:
        print(f"finetune pipeline: error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # between stages (a stage's own Ctrl-C is in its row of the report)
        print("finetune pipeline: interrupted (Ctrl-C); rerun the same command to continue", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
