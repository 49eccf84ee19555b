"""How a stage runs: the one place that builds a stage's command line and runs a stage's `main`.

Three callers, one command: `finetune <stage>` (re-run under `accelerate launch` when the recipe names
an accelerate config), `finetune pipeline` (each stage in its own process) and the Azure ML job (the
same command inside the job's code snapshot, launched by Azure ML once per GPU). The command a user
would type, `accelerate launch --config_file CFG finetune/sft.py RECIPE key=value ...`, is exactly
what each of them runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from finetune.core import distributed, faults, ownership, stopping, tracking
from finetune.core.locks import output_lock, target_lock
from finetune.core.logs import setup_logging
from finetune.errors import UserError
from finetune.recipe import STAGES, Recipe, RecipeError, dump_recipe, load_recipe


def launched() -> bool:
    """True inside `accelerate launch` / torchrun (they set these for every process)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCH" in os.environ


def stage_script(stage: str, root: str | Path | None = None) -> str:
    """The file that runs `stage` (its module's file); relative to `root` when given (a job snapshot)."""
    origin = Path(importlib.util.find_spec(STAGES[stage].module).origin).resolve()
    if root is None:
        return str(origin)
    return origin.relative_to(Path(root).resolve()).as_posix()


def stage_command(
    stage: str,
    recipe_path: str,
    overrides: list[str],
    accelerate_config: str | None = None,
    num_processes: int | None = None,
    python: str = sys.executable,
    script: str | None = None,
) -> list[str]:
    """The command line that runs a stage: plain python, or accelerate launch with its config.

    `python` and `script` default to this interpreter and this checkout's stage file; an Azure ML job
    passes `python` and the path inside its code snapshot."""
    script = script or stage_script(stage)
    if accelerate_config is None:
        return [python, script, recipe_path, *overrides]
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return [*cmd, script, recipe_path, *overrides]


def recipe_command(recipe: Recipe, recipe_path: str, stage: str, overrides: list[str]) -> list[str]:
    """How `finetune <stage>` runs the stage for this recipe: under its accelerate config, if it names
    one and the stage may use a launcher (export never needs one)."""
    config = recipe.resolve_path(recipe.launch.accelerate_config) if STAGES[stage].launcher else None
    return stage_command(stage, recipe_path, overrides, config, recipe.launch.num_processes if config else None)


# Flags every stage command takes that are recipe overrides in disguise (so a launcher, the pipeline
# and an Azure ML job pass them on as overrides, and the resolved recipe records them).
FLAG_OVERRIDES = {"--verbose": "logging.verbose=true"}
VERBOSE_HELP = (
    "also print the raw detail: the Trainer's log dictionaries, library warnings and the libraries' "
    "progress bars (the recipe key logging.verbose)"
)


def flags_to_overrides(argv: list[str]) -> list[str]:
    """`--verbose` -> `logging.verbose=true` (after the other arguments, so it wins)."""
    return [a for a in argv if a not in FLAG_OVERRIDES] + [FLAG_OVERRIDES[a] for a in argv if a in FLAG_OVERRIDES]


def recipe_from_argv(argv: list[str], stage: str, prog: str) -> Recipe | None:
    """`RECIPE [key=value ...] [--print-config] [--verbose]` as every stage script and `finetune <stage>` take it.

    Returns None when --print-config asked only for the resolved recipe (printed here)."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Run the {stage} stage of a recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_chat.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=/tmp/run sft.max_steps=20")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides + (["logging.verbose=true"] if args.verbose else []))
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return None
    if recipe.section(stage) is None:
        raise RecipeError(f"{args.recipe}: {stage}: section missing; this recipe has no {stage} stage")
    return recipe


INTERRUPTED = 130  # the shell's 128 + SIGINT
# After passing a SIGTERM on, how long a stage may take to finish its step and checkpoint before a second SIGTERM
# stops it at once (Azure ML gives a low-priority node about 30 s; a scheduler's own kill may come sooner).
TERM_GRACE = 300


@contextlib.contextmanager
def ignoring_sigterm():
    """SIGTERM ignored for the block (main thread only), while a stopping child is waited for."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ignoring_sigint():
    """SIGINT ignored for the block (the main thread only can set handlers; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def before_loading(recipe: Recipe, stage: str) -> None:
    """What every stage checks before it writes or loads anything: its optional libraries, that the folders it
    will replace are its own (core.ownership: never a user's folder, never another stage's), that a training
    stage's precision runs here (fp16 needs CUDA), whether its settings fit the model (context length, LoRA targets
    and rank), then whether its estimated memory fits this machine (a clear stop now instead of an out-of-memory
    kill later)."""
    missing = STAGES.missing_libraries([stage])
    if missing:
        raise UserError(f"finetune {stage}: {'; '.join(missing)}")
    entry, section = STAGES[stage], recipe.section(stage)
    key = f"{stage}.{entry.output_key}" if entry.output_key and getattr(section, entry.output_key) else "output_dir"
    fix = f"Set {key} to another folder, or move that one away yourself"
    try:
        ownership.check_target(recipe.stage_dir(stage), ownership.stage_kind(stage), fix)
        ownership.check_target(recipe.checkpoint_dir(stage), ownership.checkpoints_kind(stage), fix)
    except ownership.NotOurs as e:
        raise UserError(f"{recipe.source}: {key}: {e}") from None
    from finetune.core.lineage import check_not_being_written  # torch: only once a stage runs

    check_not_being_written(recipe, list(STAGES.inputs(stage)), f"finetune {stage}")
    from finetune.core.limits import check_limits  # torch: only once a stage runs, not for `finetune --help`
    from finetune.core.memory import preflight
    from finetune.core.training import check_precision

    if not (entry.memory.merge_only or entry.memory.lm_eval):  # a stage that trains: fp16 without CUDA never runs,
        check_precision(recipe)  # whatever the memory estimate says
    check_limits(recipe, stage)
    preflight(recipe, stage)


def stage_main(stage: str, run, argv: list[str] | None) -> int:
    """What every stage module's main() does: parse `RECIPE [overrides] [--print-config]`, take the stage's
    lock on the output folder, then run, reporting to the recipe's trackers (`logging.report_to`) for as
    long as it runs. A user's mistake (recipe, data, template), a second run into the same output, a full
    disk or a read-only folder is one message and exit status 2; Ctrl-C is one line and exit status 130.
    Never a traceback for those."""
    recipe = None
    stopping.install()  # SIGTERM (a scheduler, an Azure ML low-priority node): like Ctrl-C, after a checkpoint
    try:
        recipe = recipe_from_argv(sys.argv[1:] if argv is None else argv, stage, f"finetune {stage}")
        if recipe is not None:
            setup_logging(distributed.is_main(), recipe.logging.verbose)  # before anything loads and warns
            before_loading(recipe, stage)  # nothing written yet, not even the lock
            with (
                output_lock(
                    *target_lock(recipe.stage_dir(stage)),  # beside its output, wherever that is (export.output)
                    f"the {stage} stage",
                    "wait for it to finish, stop it, or set output_dir to another folder",
                ),
                tracking.stage_run(recipe, stage),
            ):
                run(recipe)
    except UserError as e:
        print(f"finetune {stage}: error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, stopping.Terminated)
        with ignoring_sigint():  # a second Ctrl-C must not turn this into a traceback
            why = f"terminated (SIGTERM{'; ' + str(e) if str(e) else ''})" if terminated else "interrupted (Ctrl-C)"
            print(
                f"finetune {stage}: {why}. Nothing half-written was kept: outputs and checkpoints count only once "
                "complete. Rerun the same command to continue from the last complete checkpoint",
                file=sys.stderr,
            )
        return stopping.TERMINATED if terminated else INTERRUPTED
    except Exception as e:
        where = recipe.output_path(recipe.output_dir) if recipe is not None else Path.cwd()
        message = faults.describe(e, where)
        if message is None:
            raise
        print(f"finetune {stage}: error:\n{message}", file=sys.stderr)
        return 2
    return 0


def run_child(cmd: list[str], env: dict | None = None) -> int:
    """Run a stage's command and return its exit status. On Ctrl-C the child, in the same terminal, got its
    own SIGINT: give it time to stop cleanly (forward SIGINT if it did not get one, e.g. `kill -INT` of this
    process only), then re-raise KeyboardInterrupt. subprocess.call would SIGKILL it after 0.25 s. SIGTERM
    (sent to this process only) is passed on to the child, which checkpoints and stops."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt as e:
        stop_child(proc, isinstance(e, stopping.Terminated))
        raise


def stop_child(proc: subprocess.Popen, terminated: bool = False) -> None:
    """After a Ctrl-C: the child, in the same terminal, got its own SIGINT; give it 2 s to stop, then send it
    one (e.g. `kill -INT` reached only this process), then SIGTERM after a minute. After a SIGTERM (sent to this
    process alone, as schedulers do): pass it on at once, and wait for the child's checkpoint. Further Ctrl-Cs
    and SIGTERMs are ignored meanwhile, so they cannot leave the child running."""
    with ignoring_sigint(), ignoring_sigterm():
        if terminated:  # one SIGTERM: the child finishes its step and checkpoints (a second would stop it at once)
            proc.terminate()
            try:
                proc.wait(timeout=TERM_GRACE)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            return
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()


def run_stage(stage: str, argv: list[str]) -> int:
    """`finetune <stage> RECIPE ...`: in this process, or re-launched under the recipe's accelerate config."""
    module = importlib.import_module(STAGES[stage].module)
    if any(not a.startswith("-") for a in argv):  # a recipe is named: flags become its overrides
        argv = flags_to_overrides(argv)
    if not STAGES[stage].launcher or "--print-config" in argv or launched() or not argv:
        return module.main(argv)
    recipe_path, overrides = argv[0], argv[1:]
    recipe = load_recipe(recipe_path, overrides)
    if recipe.launch.accelerate_config is None:
        return module.main(argv)
    cmd = recipe_command(recipe, recipe_path, stage, overrides)
    print("+ " + " ".join(cmd), file=sys.stderr)
    stopping.install()
    try:
        return run_child(cmd)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, stopping.Terminated)
        why = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
        print(f"finetune {stage}: {why}; rerun the same command to continue", file=sys.stderr)
        return stopping.TERMINATED if terminated else INTERRUPTED
