"""Eval stage: benchmark the trained model and its base with lm-evaluation-harness, side by side.

    finetune eval RECIPE [key=value ...]                  the recipe's `eval` section; <output_dir>/eval/
    finetune eval MODEL_DIR --recipe RECIPE [key=value]   an exported folder, tasks and base from the recipe
    finetune eval MODEL_DIR --tasks ifeval,gsm8k [--include-path DIR] [--out DIR]

the model (the export, or a stage's adapter chain merged in memory: finetune.core.serving) -> each
task group (same few-shot count and chat-template setting) through lm_eval.simple_evaluate with the
model in memory (lm_eval's HFLM) -> the same for the base -> results.json (lm-eval's own results,
configs and versions for both), results.md (the table), metrics.json (headline: the first task's
first metric, base and model) -> summary.

Prompts: with `apply_chat_template` lm-eval renders each prompt through the tokenizer's chat template
(the one the stages trained with; few-shot examples as turns, lm-eval's fewshot_as_multiturn) and
generation stops at the template's end-of-turn token (the generation config's EOS). No BOS is added:
the templates write their special tokens themselves (finetune.chat_template.encode).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from finetune.core import lineage, ownership
from finetune.core.logs import setup_logging
from finetune.core.outputs import atomic_dir, read_metrics, write_json
from finetune.core.progress import library_bars_off, progress
from finetune.core.serving import Loaded, load_base, load_folder, load_recipe_model
from finetune.core.summary import print_summary
from finetune.errors import UserError
from finetune.launch import stage_main
from finetune.recipe import STAGES, Recipe, RecipeError, load_recipe
from finetune.recipe.sections import EvalSection

log = logging.getLogger("finetune.eval")

INSTALL = STAGES["eval"].requires[0][1]


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise RecipeError(f"finetune eval needs lm-evaluation-harness ({e.name} is missing): {INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def task_manager(section: EvalSection, include_path: str | None):
    """lm-eval's task index: only the include_path when it defines every task (indexing lm-eval's own
    thousands of task YAMLs takes seconds), else lm-eval's tasks plus it. Unknown names are refused here."""
    _, _, TaskManager = _lm_eval()
    names = [t.name for t in section.tasks]
    if include_path:
        if not Path(include_path).is_dir():
            raise RecipeError(f"eval.include_path: {include_path} is not a folder of lm-eval task YAMLs")
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            check_task_code(manager, names)
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise RecipeError(
            f"eval.tasks: {', '.join(unknown)}: not an lm-eval task or group"
            + (f" (nor defined in {include_path})" if include_path else "")
            + "; `lm-eval ls tasks` lists them, or define your own task YAML in eval.include_path"
        )
    check_task_code(manager, names)
    return manager


def missing_package(task: str, error: ImportError) -> RecipeError:
    """A task whose own code needs a package that is not installed (ifeval: langdetect, immutabledict, nltk)."""
    cause = error
    while cause.__cause__ is not None and isinstance(cause.__cause__, ImportError):
        cause = cause.__cause__
    package = getattr(cause, "name", None)
    needs = (
        f"needs the Python package {package!r}, which is not installed: pip install {package}"
        if package
        else f"cannot be imported ({(str(cause).strip().splitlines() or ['ImportError'])[0][:300]})"
    )
    return RecipeError(
        f"eval.tasks: {task}: the task's code {needs} (lm-evaluation-harness has extras for its tasks' packages, "
        "e.g. pip install 'lm_eval[ifeval]'), or leave the task out. Nothing was scored"
    )


def check_task_code(manager, names: list[str]) -> None:
    """Import the code of every task `names` runs (their YAMLs' `!function`s, through groups and tags) before any
    model loads, so that a package a task needs and lacks is one message now, not a traceback after loading.
    Reads lm-eval's task index (lm_eval.tasks._yaml_loader, lm-eval 0.4.x); with another layout the import
    happens in simple_evaluate, where run_tasks gives the same message."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        return
    index = getattr(manager, "task_index", {})
    seen, todo = set(), [(n, n) for n in names]
    while todo:
        name, asked = todo.pop()
        if name in seen or not isinstance(name, str):
            continue
        seen.add(name)
        entry = index.get(name)
        if entry is None:
            continue
        kind = getattr(entry.kind, "name", "")
        if kind == "TAG":
            todo.extend((e.name, asked) for e in index.values() if name in (getattr(e, "tags", None) or ()))
            continue
        if getattr(entry, "yaml_path", None) is None:
            continue
        try:
            config = load_yaml(entry.yaml_path, resolve_func=True)
        except ImportError as e:
            raise missing_package(asked, e) from None
        except Exception:  # noqa: BLE001 - lm-eval's own business; simple_evaluate reports it in its words
            continue
        children = config.get("task") if kind == "GROUP" else None
        for child in children if isinstance(children, list) else []:  # a group: its tasks and groups
            todo.append((child if isinstance(child, str) else (child or {}).get("task"), asked))


def run_tasks(loaded: Loaded, section: EvalSection, manager, seed: int) -> dict:
    """lm-eval on one model: the tasks grouped by (few-shot count, chat template, limit), one
    simple_evaluate per group. Returns lm-eval's results, n-shot, configs and versions, merged."""
    lm_eval, HFLM, _ = _lm_eval()
    lm = HFLM(
        pretrained=loaded.model,
        tokenizer=loaded.tokenizer,
        batch_size=section.batch_size,
        max_length=section.max_length,
        add_bos_token=False,  # the chat templates write every special token themselves
    )
    groups: dict[tuple, list[str]] = {}
    for task in section.tasks:
        chat = section.apply_chat_template if task.apply_chat_template is None else task.apply_chat_template
        groups.setdefault((task.num_fewshot, chat, task.limit), []).append(task.name)
    merged = {"results": {}, "groups": {}, "n-shot": {}, "configs": {}, "versions": {}, "settings": {}}
    for (shots, chat, limit), names in groups.items():
        log.info("lm-eval: %s (%s-shot, chat template %s) on %s", names, shots, chat, loaded.description)
        # timed lines when not a terminal, instead of lm-eval's bars
        with (
            library_bars_off(always=False),
            progress(f"lm-eval {', '.join(names)} on {loaded.description}"),
            _missing_packages(names),
        ):
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                limit=int(limit) if limit is not None and limit >= 1 else limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        for key in ("results", "groups", "n-shot", "configs", "versions"):
            merged[key].update(out.get(key) or {})
        for name in names:
            merged["settings"][name] = {"num_fewshot": shots, "apply_chat_template": chat, "limit": limit}
    return merged


@contextlib.contextmanager
def _missing_packages(names: list[str]):
    """A task's missing package met while lm-eval runs it (what check_task_code could not see): one message."""
    try:
        yield
    except ImportError as e:
        raise missing_package(", ".join(names), e) from None


def primary(results: dict, task: str) -> tuple[str, float | None]:
    """(metric,filter key, value) of a task's first reported metric (lm-eval lists them in the task's
    metric_list order; the stderr entries are skipped)."""
    entry = results.get(task) or {}
    for key, value in entry.items():
        if "," in key and "_stderr" not in key and isinstance(value, int | float):
            return key, float(value)
    return "", None


def table(section: EvalSection, model: dict, base: dict | None) -> list[list[str]]:
    """Rows of task | metric | n-shot | chat | base | model | change, for every metric of every task asked."""
    rows = []
    for task in section.tasks:
        got = model["results"].get(task.name, {})
        settings = model["settings"][task.name]
        for key, value in got.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            before = (base or {}).get("results", {}).get(task.name, {}).get(key)
            change = f"{value - before:+.4f}" if isinstance(before, int | float) else ""
            shots = model["n-shot"].get(task.name, settings["num_fewshot"])
            rows.append(
                [
                    task.name,
                    _metric_name(key),
                    "-" if shots is None else str(shots),
                    "yes" if settings["apply_chat_template"] else "no",
                    f"{before:.4f}" if isinstance(before, int | float) else "n/a",
                    f"{value:.4f}",
                    change,
                ]
            )
    return rows


HEADER = ["task", "metric", "n-shot", "chat template", "base", "model", "change"]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [HEADER, ["-" * w for w in widths], *rows])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def evaluate(
    load: callable,
    section: EvalSection,
    include_path: str | None,
    out: Path,
    seed: int,
    base: callable | None = None,
    extra: dict | None = None,
    finish=None,
) -> dict:
    """Score the model `load()` gives (and the base `base()` gives, after the model is freed); write `out`."""
    import gc

    manager = task_manager(section, include_path)
    started = time.time()
    model = load()
    description = model.description
    scored = run_tasks(model, section, manager, seed)
    del model
    gc.collect()  # never two models in memory at once
    base_scores, base_description = None, None
    if base is not None:
        loaded_base = base()
        base_description = loaded_base.description
        base_scores = run_tasks(loaded_base, section, manager, seed)
        del loaded_base
        gc.collect()
    first = section.tasks[0].name
    metric, score = primary(scored["results"], first)
    _, score_base = primary(base_scores["results"], first) if base_scores else ("", None)
    rows = table(section, scored, base_scores)
    metrics = {
        "model": description,
        "base": base_description,
        "tasks": [t.name for t in section.tasks],
        "score_metric": f"{first} {_metric_name(metric)}",
        "score": score,
        "score_base": score_base,
        **{
            f"{who}/{task}/{_metric_name(key)}": value
            for who, got in (("model", scored), ("base", base_scores))
            if got
            for task, entry in got["results"].items()
            for key, value in entry.items()
            if isinstance(value, int | float) and "_stderr" not in key and "," in key
        },
        **(extra or {}),
        "eval_runtime_s": time.time() - started,
    }
    if finish is not None:  # a recipe's eval stage: what it was made from (core.lineage)
        metrics = finish(metrics)
    with atomic_dir(out, ownership.stage_kind("eval")) as tmp:
        write_json(tmp / "results.json", {"model": scored, "base": base_scores, "descriptions": metrics})
        (tmp / "results.md").write_text(markdown_table(rows))
        write_json(tmp / "metrics.json", metrics)  # last: its presence marks a finished stage
    print(f"\n{format_table(rows)}", file=sys.stderr)
    print_summary(
        STAGES["eval"].summary_title,
        [
            ("model", description),
            ("base", base_description or "not scored (eval.base: false)"),
            ("headline", f"{metrics['score_metric']}: {_fmt(score_base)} (base) -> {_fmt(score)}"),
            ("time", f"{metrics['eval_runtime_s']:.1f}s"),
            ("output", f"{out} (results.json, results.md, metrics.json)"),
        ],
    )
    return metrics


def _metric_name(key: str) -> str:
    """lm-eval's "metric,filter" as metric (filter none) or metric/filter: names every tracker accepts."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run(recipe: Recipe) -> dict:
    """`finetune eval RECIPE`: the recipe's model (eval.model) and base on the eval section's tasks."""
    section = recipe.eval
    export = read_metrics(recipe.stage_dir(STAGES.model_folder_stage()))
    inputs = lineage.upstream(recipe, "eval")  # what it scores, taken before it loads
    extra = {"correct_rate_export": export.get("correct_rate_after")} if export else {}
    return evaluate(
        lambda: load_recipe_model(recipe, section.model, key="eval.model"),
        section,
        recipe.resolve_path(section.include_path),
        recipe.stage_dir("eval"),
        recipe.seed,
        base=(lambda: load_base(recipe)) if section.base else None,
        extra=extra,
        finish=lambda metrics: lineage.stamp(recipe, "eval", metrics, inputs),
    )


def _folder_main(args) -> int:
    """`finetune eval MODEL_DIR ...`: a model folder, with a recipe's eval section or --tasks."""
    folder = Path(args.target)
    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.eval is None and not args.tasks:
            raise RecipeError(f"{args.recipe}: eval: section missing; add one or pass --tasks")
        section = recipe.eval or EvalSection(tasks=args.tasks.split(","))
        include = recipe.resolve_path(section.include_path)
    else:
        if args.overrides:
            raise RecipeError(f"{folder}: key=value overrides apply to a recipe: pass --recipe RECIPE")
        if not args.tasks:
            raise RecipeError(f"{folder}: name the tasks (--tasks ifeval,gsm8k) or a recipe with an eval section")
        recipe, section, include = None, EvalSection(tasks=args.tasks.split(",")), None
    if args.tasks:
        section = section.model_copy(update={"tasks": EvalSection(tasks=args.tasks.split(",")).tasks})
    if args.include_path:
        include = str(Path(args.include_path).resolve())
    if args.no_base:
        section = section.model_copy(update={"base": False})
    out = Path(args.out) if args.out else folder.with_name(f"{folder.name}-eval")
    ownership.check_target(out, ownership.stage_kind("eval"), "Name another --out folder, or move that one away")
    _lm_eval()
    metrics = read_metrics(folder)
    extra = {"correct_rate_export": metrics.get("correct_rate_after")} if metrics else {}
    base = (lambda: load_base(recipe)) if recipe is not None and section.base else None
    evaluate(
        lambda: load_folder(folder), section, include, out, recipe.seed if recipe else 1234, base=base, extra=extra
    )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune eval",
        description="Benchmark a model (and its base) with lm-evaluation-harness. RECIPE: its eval section, its "
        "model (eval.model) and base. MODEL_DIR: an exported folder, with --recipe or --tasks.",
    )
    p.add_argument("target", help="recipe YAML, or a model folder (finetune export's output)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe, e.g. eval.batch_size=16")
    p.add_argument("--recipe", help="with MODEL_DIR: the recipe whose eval section (and base) to use")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (instead of the recipe's)")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--out", help="with MODEL_DIR: results folder (default: <MODEL_DIR>-eval)")
    p.add_argument("--no-base", action="store_true", help="score the model only")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_intermixed_args(argv)
    if not Path(args.target).is_dir():  # a recipe: a stage like the others (trackers, --print-config)
        if args.recipe or args.out or args.include_path:
            print("finetune eval: --recipe, --out and --include-path go with a MODEL_DIR", file=sys.stderr)
            return 2
        rest = [args.target, *args.overrides, *(["--print-config"] if args.print_config else [])]
        if args.tasks:
            rest.append(f"eval.tasks=[{args.tasks}]")
        if args.no_base:
            rest.append("eval.base=false")
        return stage_main("eval", run, rest)
    try:
        setup_logging()
        return _folder_main(args)
    except UserError as e:
        print(f"finetune eval: error:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
