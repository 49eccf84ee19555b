"""Stage outputs: atomic folders, metrics.json, the resolved recipe and the end-of-stage summary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from finetune.recipe import STAGES, Recipe, RecipeError, dump_recipe

from . import distributed, progress
from .integrity import DamagedFileError, read_json

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"  # greedy replies to the recipe's sample prompts, beside metrics.json


# Library messages a user cannot act on, silenced unless logging.verbose (`--verbose`). Each is either a
# deprecation inside the libraries' own code or a statement about the environment that finetune already
# makes in its own log (the attention kernel line says where the model runs).
QUIET_WARNINGS = [
    # peft and trl read `model.is_gradient_checkpointing`, deprecated in transformers 5 (their code, not ours)
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
]
QUIET_LOG_LINES = {
    # DeepSpeed at import, on every machine without a GPU (deepspeed/accelerator/real_accelerator.py)
    "DeepSpeed": ("Setting accelerator to CPU", "Setting ds_accelerator to"),
    # lm-eval, when handed a model object (finetune eval does so on purpose: the model is loaded once, by us)
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}
# Libraries whose INFO lines restate what the stage's own log says (set to WARNING unless verbose)
QUIET_LOGGERS = ["lm_eval"]
_quieted = False


class DropMessages(logging.Filter):
    """A logging filter dropping the records whose message contains one of `texts`."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(t in message for t in self.texts)


def setup_logging(main_process: bool = True, verbose: bool = False):
    """The stage log: `HH:MM:SS LEVEL logger: message` on stderr, INFO on the main process and WARNING on
    the others. Unless `verbose`, library warnings a user cannot act on (QUIET_WARNINGS, QUIET_LOG_LINES)
    are silenced and, when output is not a terminal, the libraries' own progress bars are off
    (finetune.core.progress reports instead)."""
    global _quieted
    logging.basicConfig(
        level=logging.INFO if main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if verbose or _quieted:
        return
    _quieted = True
    import warnings

    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, texts in QUIET_LOG_LINES.items():
        logging.getLogger(name).addFilter(DropMessages(*texts))  # kept when the library configures its logger
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if progress.mode() != "bar":
        # Their carriage-return redraws are a wall of text in a log file; load_model, the data loader and
        # the Trainer report through finetune.core.progress instead. At a terminal they stay (downloads).
        # The environment switches them off in libraries not imported yet (without importing them here).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it at import
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def staging_dir(target: Path, reset: bool = True) -> Path:
    """The temporary folder beside `target` where a stage writes before `commit_dir`.

    Its name is fixed so every launched process writes into the same one; an interrupted stage
    leaves only this hidden folder, never a half-written `target`.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    if reset:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` (and the folder) to disk, so that once renamed into place it is complete
    even after a power loss: rename is atomic, but without fsync the data may not be on disk yet."""
    for path in [*sorted(Path(folder).rglob("*"), reverse=True), Path(folder)]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a directory
            pass
        finally:
            os.close(fd)


def commit_dir(tmp: Path, target: Path) -> None:
    """Replace `target` with the finished `tmp` folder (rename, so readers never see a partial one)."""
    target = Path(target)
    fsync_tree(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: Path):
    """Single-process form: yield a staging folder, commit it on success, remove it on failure."""
    tmp = staging_dir(target)
    try:
        yield tmp
        commit_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_samples(folder: Path, samples: list[dict] | None) -> None:
    """`samples.jsonl`: one JSON row per sample prompt with each model's reply (nothing when there are none)."""
    if samples:
        (folder / SAMPLES_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))


DROPPED_ROWS = "dropped_rows.jsonl"


def write_dropped_rows(folder: Path, reports: dict) -> int:
    """`dropped_rows.jsonl`: every row the stage did not use (malformed, over-long, no learning signal,
    repeated prompt, beyond max_eval_rows), one line each with its split, source, row number, kind and reason.
    `reports`: split name -> DataReport. Written only when something was dropped; returns the count."""
    rows = [{"split": name, **d} for name, report in reports.items() for d in report.drops]
    if rows:
        (folder / DROPPED_ROWS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def write_stage_files(
    folder: Path, recipe: Recipe, metrics: dict, *, samples: list[dict] | None = None, reports: dict | None = None
) -> None:
    """recipe.yaml, the samples (greedy replies to the recipe's held-out sample prompts, one JSON row
    each), dropped_rows.jsonl and metrics.json, written last: its presence marks a finished output."""
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    write_samples(folder, samples)
    write_dropped_rows(folder, reports or {})
    write_json(folder / "metrics.json", metrics)


def print_summary(title: str, lines: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in lines)
    print(f"\n== {title} ==", file=sys.stderr)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}", file=sys.stderr)


def save_adapter(trainer, folder: Path) -> None:
    """The trainer's model (adapter and any saved head, PEFT) into `folder`, by the processes the Trainer saves on
    (rank 0, or every node's local rank 0 with save_on_each_node).

    When the weights are partitioned the Trainer's own save_model falls short: under FSDP with sharded state
    dicts (recipes/accelerate/fsdp2.yaml) it writes nothing, and under ZeRO-3 it consolidates the weights on rank
    0 only, so another node's writer saves an adapter of empty tensors (the empty-adapter trap of trl#4416 /
    peft#2500, seen here on a second node). Then the trained tensors (LoRA, score head, modules_to_save copies)
    are gathered on every process (one collective each: every process takes part) and saved as a plain PEFT
    folder; the frozen base is never gathered."""
    from .modeling import whole_parameter

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    fsdp_sharded = (
        trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if not (fsdp_sharded or zero3):
        trainer.save_model(str(folder))
        return
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with whole_parameter(p) as full:
                state[name] = full.detach().cpu().clone()
    if trainer.args.should_save:
        model.save_pretrained(str(folder), state_dict=state)


def save_stage(
    trainer,
    recipe: Recipe,
    stage: str,
    tokenizer,
    metrics: dict,
    *,
    samples: list[dict] | None = None,
    reports: dict | None = None,
) -> Path:
    """Write `<output_dir>/<stage>/` atomically: adapter (and any saved head), tokenizer with its chat
    template, resolved recipe, metrics.json, log_history.json, dropped_rows.jsonl (from `reports`). Every
    launched process calls this; the main one writes."""
    out = recipe.stage_dir(stage)
    writer = distributed.writes_output(recipe.output_path(recipe.output_dir))
    # every writer (one per node when each node has its own output folder) writes the main process's figures
    metrics, samples = distributed.broadcast_from_main((metrics, samples))
    tmp = staging_dir(out, reset=writer)
    trainer.accelerator.wait_for_everyone()
    # adapter only (PEFT); every process takes part under DeepSpeed ZeRO-3 and FSDP (the weights are gathered),
    # and the Trainer writes on rank 0, or on every node's local rank 0 with save_on_each_node
    save_adapter(trainer, tmp)
    failure, error = None, None
    if writer:
        try:
            tokenizer.save_pretrained(str(tmp))  # includes the chat template
            # the training curves (loss, lr, ... per logging step), for the pipeline's plot
            write_json(tmp / "log_history.json", trainer.state.log_history)
            write_stage_files(tmp, recipe, metrics, samples=samples, reports=reports)
            commit_dir(tmp, out)
        except Exception as e:  # tell the other processes instead of leaving them waiting at the barrier
            failure, error = f"{type(e).__name__}: {e}", e
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written staging folder only takes space
    failure = distributed.broadcast_from_main(failure)
    if error is not None:
        raise error  # the original (its errno says e.g. "disk full")
    if failure:
        raise RuntimeError(f"saving {out} failed on the main process: {failure}")
    return out


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def finished(recipe: Recipe, stage: str) -> bool:
    """A stage's output is complete: its metrics.json is written last, inside the atomically renamed folder."""
    return (recipe.stage_dir(stage) / "metrics.json").is_file()


def read_metrics(folder: str | Path) -> dict:
    """A stage output's metrics.json ({} when the stage has not finished). A damaged one (it is written
    atomically, so only a fault outside finetune makes one) is a DamagedFileError naming it and the fix."""
    f = Path(folder) / "metrics.json"
    if not f.is_file():
        return {}
    metrics = read_json(
        f,
        f"the output {Path(folder)} is damaged: run the stage that made it again (finetune <stage> RECIPE; "
        "finetune pipeline RECIPE --force for all), or restore the folder from a copy",
    )
    if not isinstance(metrics, dict):
        raise DamagedFileError(f"{f}: damaged (not a JSON object); run the stage that made it again")
    return metrics


def is_export_folder(folder: Path) -> bool:
    """A complete `finetune export` output: config.json and a metrics.json naming its stage and adapters."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "config.json").is_file() and isinstance(metrics, dict) and {"stage", "adapters"} <= set(metrics)


def check_export_target(recipe: Recipe, target: Path, force: bool) -> None:
    """Refuse an export target that would destroy anything but an earlier export (force replaces only
    those): the output_dir or a stage or checkpoint folder, a folder containing one, a folder inside a
    stage's, or any other existing non-empty folder. Also fails now, before loading, when the target's
    parent cannot be written."""
    key = "export.output"
    t = Path(target).expanduser().resolve()
    out = Path(recipe.output_dir).expanduser().resolve()
    keep = {"the output_dir": out}
    for name in STAGES.names():
        if name != "export":
            keep[f"the {name} stage output"] = recipe.stage_dir(name).expanduser().resolve()
        keep[f"the {name} checkpoints"] = recipe.checkpoint_dir(name).expanduser().resolve()
    for what, p in keep.items():
        if t == p or p.is_relative_to(t):
            raise RecipeError(
                f"{recipe.source}: {key}: {target} {'is' if t == p else 'contains'} {what} ({p}); exporting there "
                f"would replace it. Export to a folder of its own (the default is <output_dir>/export)"
            )
        if p != out and t.is_relative_to(p):
            raise RecipeError(
                f"{recipe.source}: {key}: {target} lies inside {what} ({p}), which is replaced when that stage runs "
                "again; export to a folder of its own (the default is <output_dir>/export)"
            )
    if t.exists():
        if not t.is_dir():
            raise RecipeError(f"{recipe.source}: {key}: {target} is a file; name a folder")
        if not force:
            raise RecipeError(
                f"{recipe.source}: {key}: {target} already exists; pass --force (or "
                "export.force=true) to replace it, or export.output=<another folder>"
            )
        if any(t.iterdir()) and not is_export_folder(t):
            raise RecipeError(
                f"{recipe.source}: {key}: {target} exists and is not an earlier export (no config.json and "
                "metrics.json naming a stage and its adapters); --force replaces only an export. Choose another "
                "export.output, "
                "or move that folder away yourself"
            )
    t.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=t.parent, prefix=f".{t.name}.probe"):
        pass


def key_metrics(stage: str, metrics: dict) -> dict:
    """The headline figures of a stage's metrics.json (None where a stage has no such figure)."""
    name, before, after = STAGES[stage].headline or (None, None, None)
    c_before, c_after = STAGES[stage].correctness or (None, None)
    return {
        "metric": name,
        "before": metrics.get(before) if before else None,
        "after": metrics.get(after) if after else None,
        "correct_before": metrics.get(c_before) if c_before else None,
        "correct_after": metrics.get(c_after) if c_after else None,
    }


def figure(value, metric: str | None = None) -> str:
    """A metric value for a table: accuracies as percentages, small numbers in scientific notation."""
    if value is None:
        return "n/a"
    if metric and "accuracy" in metric:
        return rate(value)
    if isinstance(value, float) and abs(value) < 1e-3 and value != 0:
        return f"{value:.1e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
