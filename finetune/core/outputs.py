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

from finetune.recipe import STAGES, Recipe, dump_recipe

from . import distributed, progress

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
}
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


def commit_dir(tmp: Path, target: Path) -> None:
    """Replace `target` with the finished `tmp` folder (rename, so readers never see a partial one)."""
    target = Path(target)
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


def write_stage_files(folder: Path, recipe: Recipe, metrics: dict, samples: list[dict] | None = None) -> None:
    """recipe.yaml, the samples (greedy replies to the recipe's held-out sample prompts, one JSON row
    each) and metrics.json, written last: its presence marks a finished output."""
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    write_samples(folder, samples)
    write_json(folder / "metrics.json", metrics)


def print_summary(title: str, lines: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in lines)
    print(f"\n== {title} ==", file=sys.stderr)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}", file=sys.stderr)


def save_stage(
    trainer, recipe: Recipe, stage: str, tokenizer, metrics: dict, samples: list[dict] | None = None
) -> Path:
    """Write `<output_dir>/<stage>/` atomically: adapter (and any saved head), tokenizer with its chat
    template, resolved recipe, metrics.json, log_history.json. Every launched process calls this;
    the main one writes."""
    out = recipe.stage_dir(stage)
    main_process = distributed.is_main()
    tmp = staging_dir(out, reset=main_process)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # adapter only (PEFT); every process takes part under DeepSpeed
    failure = None
    if main_process:
        try:
            tokenizer.save_pretrained(str(tmp))  # includes the chat template
            # the training curves (loss, lr, ... per logging step), for the pipeline's plot
            write_json(tmp / "log_history.json", trainer.state.log_history)
            write_stage_files(tmp, recipe, metrics, samples)
            commit_dir(tmp, out)
        except Exception as e:  # tell the other processes instead of leaving them waiting at the barrier
            failure = f"{type(e).__name__}: {e}"
    failure = distributed.broadcast_from_main(failure)
    if failure:
        raise RuntimeError(f"saving {out} failed on the main process: {failure}")
    return out


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def finished(recipe: Recipe, stage: str) -> bool:
    """A stage's output is complete: its metrics.json is written last, inside the atomically renamed folder."""
    return (recipe.stage_dir(stage) / "metrics.json").is_file()


def read_metrics(folder: str | Path) -> dict:
    """A stage output's metrics.json ({} when the stage has not finished)."""
    f = Path(folder) / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


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
