"""The whole recipe in one command: every stage in pipeline order, each in its own process.

    finetune pipeline RECIPE [key=value ...] [--force]

Each stage runs exactly as `finetune <stage> RECIPE [key=value ...]` would launch it (plain python,
or `accelerate launch --config_file <launch.accelerate_config>`; export always plain), with the same
overrides. `pipeline.stages` picks a subset; the order is always the one above.

Which stages run: a stage whose finished output (`<output_dir>/<stage>/metrics.json`, written last inside the
atomically renamed folder) records that it was made from what the recipe and the earlier outputs make now (its
fingerprint: the settings that shape it, the data's content, the base weights, the template and the adapters it
read; finetune.core.fingerprints) is skipped as up to date. Any other stage runs, and the log line and the
report say why (no output yet, or what changed: `sft.learning_rate: 0.002 -> 0.001`, the data of
`dpo.data.train` changed, `ppo.start_from (the adapters it starts from) was made again`); a later stage whose
inputs were made again is then out of date in turn. A finished output that is out of date starts over
(`<stage>.resume=false`, `export.force=true`); an unfinished one resumes from its checkpoints unless an
earlier stage ran in this pipeline. `--force` (`pipeline.force=true`) runs everything again.

At the end: one table (stage, key metric before -> after, held-out correctness, time, output), the
same in `<output_dir>/pipeline_report.json`, and every stage's training curves in
`<output_dir>/pipeline_curves.png`, and all of it with the samples in `<output_dir>/report.html`
(finetune.cli.report). With `logging.report_to` the stages report under one tracker run
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

from finetune.core import progress, stopping, tracking
from finetune.core.locks import output_lock
from finetune.core.outputs import finished, read_metrics, write_json
from finetune.core.summary import figure, rate
from finetune.errors import UserError
from finetune.launch import (
    INTERRUPTED,
    VERBOSE_HELP,
    ignoring_sigint,
    ignoring_sigterm,
    recipe_command,
    run_child,
    stop_child,
)
from finetune.recipe import STAGES, Recipe, load_recipe
from finetune.rl.rules import load_rules

from .report import CURVES, plot_curves, write_page
from .report import PIPELINE_REPORT as REPORT


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


def html_report(out: Path, recipe: Recipe) -> Path | None:
    """report.html (finetune.cli.report); a page that cannot be drawn is a warning, never the pipeline's failure."""
    try:
        return write_page(out, recipe=recipe)
    except Exception as e:  # any fault: the figures are already in pipeline_report.json
        print(f"finetune pipeline: report.html not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


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
            f"{processes} processes), {getattr(section, 'ppo_epochs', getattr(section, 'num_iterations', 1))} epochs x "
            f"{section.mini_batches} "
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
        planned_world,
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
            settings = stage_settings(recipe, stage, where, processes, planned_world(recipe, stage))
            est = estimate_stage(stage, shape, settings)
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
            shards = ""
            if settings.sharding and settings.zero_shards == 1:
                shards = f"; {settings.sharding}"
            elif settings.sharding:
                parts = "the base and" if settings.weight_shards > 1 else "the adapters'"
                shards = f"; {settings.sharding}: {parts} optimiser state 1/{settings.zero_shards} per process"
            lines.append(f"  memory:   ~{est.total_gib:.1f} GiB {unit} ({est.breakdown()}{shards}){host}")
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
    except KeyboardInterrupt as e:  # let the stage stop cleanly (its own message, its checkpoint), then say so here
        stop_child(proc, isinstance(e, stopping.Terminated))
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


def freshness(recipe: Recipe, stage: str) -> tuple[bool, str]:
    """(whether the stage's finished output is up to date, why): it is when what it records it was made from
    (its fingerprint: settings, data content, base weights, template, the adapters it read; core.fingerprints)
    is what the recipe and the earlier outputs make now. An output finished before finetune recorded that is
    kept (say so); --force runs it again."""
    from finetune.core import fingerprints, lineage

    metrics = read_metrics(recipe.stage_dir(stage))
    if not metrics:
        return False, "no finished output"
    if "made_from" not in metrics:
        return True, "finished before outputs recorded what they are made from; --force runs it again"
    try:
        expected = lineage.made_from(recipe, stage, lineage.upstream(recipe, stage))
    except UserError as e:
        return False, f"its inputs changed ({str(e).splitlines()[0][:200]})"
    if fingerprints.digest(expected) == metrics.get("fingerprint"):
        return True, "up to date: made from these settings, data and inputs"
    changed = fingerprints.changes(metrics["made_from"], expected, stage) or ["what it is made from"]
    more = f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
    return False, "changed since it ran: " + "; ".join(changed[:4]) + more


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
    from finetune.core.limits import check_limits  # each stage checks again; here before the first one runs

    for stage in stages:
        check_limits(recipe, stage)
        if hasattr(recipe.section(stage), "reward_terms"):  # an RL stage: a misnamed or mis-shaped rule reward
            load_rules(recipe, stage)  # stops the pipeline before its first stage, not after the earlier ones


STATUS = {0: "ran", INTERRUPTED: "interrupted", stopping.TERMINATED: "terminated (SIGTERM)"}


def run_one(recipe: Recipe, recipe_path: str, stage: str, overrides: list[str], label: str, why: str, env) -> tuple:
    """Run one stage's process: (its report row, its exit status; a stop by signal N as the shell's 128 + N)."""
    cmd = recipe_command(recipe, recipe_path, stage, overrides)
    print(f"== {label}: running ({why})\n+ {' '.join(cmd)}", file=sys.stderr, flush=True)
    started = time.time()
    try:
        code = run_stage_process(cmd, label, env=env)
    except KeyboardInterrupt as e:
        code = stopping.TERMINATED if isinstance(e, stopping.Terminated) else INTERRUPTED
    code = 128 - code if code < 0 else code
    status = STATUS.get(code, f"failed (exit {code})")
    return {**report_row(recipe, stage, status, time.time() - started), "why": why}, code


def closing_title(failed: tuple | None) -> str:
    if failed is None:
        return "pipeline done"
    stage, code = failed
    if code in (INTERRUPTED, stopping.TERMINATED):
        return f"pipeline {'interrupted (Ctrl-C)' if code == INTERRUPTED else 'terminated (SIGTERM)'} during {stage}"
    return f"pipeline stopped: {stage} failed (exit {code})"


def _run(recipe: Recipe, recipe_path: str, overrides: list[str], force: bool) -> int:
    stages = recipe.pipeline_stages()
    check_requirements(recipe, stages)
    out = Path(recipe.output_dir)
    report_path = out / REPORT
    earlier = _earlier_seconds(report_path)
    trained = [s for s in stages if STAGES[s].chat_model]
    rerun = force or recipe.pipeline.force
    ran_any = False
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
        # the recipe this stage runs with (export takes this pipeline's model), for its freshness check
        as_run = load_recipe(recipe_path, [*overrides, *stage_overrides(recipe, stage, trained, False)])
        fresh, why = freshness(as_run, stage)
        if fresh and not rerun:
            print(f"== pipeline [{i}/{len(stages)}] {stage}: skipped ({why}; output in {where})", file=sys.stderr)
            rows.append(
                {**report_row(recipe, stage, "skipped", earlier.get(stage), earlier=stage in earlier), "why": why}
            )
            continue
        # start over rather than resume: a finished output that no longer matches, or (its checkpoints were made on
        # inputs this pipeline has just made again) an earlier stage ran
        start_over = rerun or finished(recipe, stage) or ran_any
        why = "--force" if force or recipe.pipeline.force else why
        extra = [*overrides, *stage_overrides(recipe, stage, trained, start_over)]
        row, code = run_one(recipe, recipe_path, stage, extra, f"pipeline [{i}/{len(stages)}] {stage}", why, env)
        rows.append(row)
        if code != 0:
            failed = (stage, code)
            break
        write_report()
        ran_any = True
    interrupted = failed is not None and failed[1] in (INTERRUPTED, stopping.TERMINATED)
    with ignoring_sigint() if interrupted else contextlib.nullcontext(), ignoring_sigterm():  # the report, whole
        drawn = plot_curves(recipe, [r["stage"] for r in rows], out / CURVES)
        report = write_report(str(out / CURVES) if drawn else None)
        tracked.finish(report_path, failed is not None, out / CURVES if drawn else None)
        page = html_report(out, recipe)
    title = closing_title(failed)
    print(f"\n== {title} ({report['seconds']:.0f}s) ==\n{format_table(rows)}")
    print(
        f"report: {report_path}" + (f"\ncurves: {out / CURVES}" if drawn else "") + (f"\npage: {page}" if page else "")
    )
    if interrupted:
        print("finetune pipeline: stopped; rerun the same command to continue where it stopped", file=sys.stderr)
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
    stopping.install()  # SIGTERM: passed on to the running stage, which checkpoints; then the report is written
    try:
        if args.plan:
            return plan(args.recipe, args.overrides)
        return run(args.recipe, args.overrides + (["logging.verbose=true"] if args.verbose else []), args.force)
    except UserError as e:
        print(f"finetune pipeline: error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # between stages (a stage's own stop is in its row of the report)
        terminated = isinstance(e, stopping.Terminated)
        why = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
        print(f"finetune pipeline: {why}; rerun the same command to continue", file=sys.stderr)
        return stopping.TERMINATED if terminated else INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
