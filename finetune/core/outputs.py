"""Stage outputs: atomic folders (finetune's own, core.ownership), metrics.json, the resolved recipe, samples and
dropped rows."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from finetune.recipe import Recipe, dump_recipe

from . import ownership
from .integrity import DamagedFileError, read_json

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"  # greedy replies to the recipe's sample prompts, beside metrics.json


def write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file beside it + rename): readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def staging_dir(target: Path, kind: str, reset: bool = True) -> Path:
    """The temporary folder beside `target` where a run of `kind` writes before `commit_dir`.

    Its name is fixed so every launched process writes into the same one (only the main process resets it);
    an interrupted run leaves only this hidden folder, never a half-written `target`. It is marked as
    finetune's (core.ownership), so the next run may remove it.
    """
    target = Path(target)
    if reset:
        return ownership.new_staging(target, kind)
    return target.with_name(f".{target.name}.tmp")


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


def commit_dir(tmp: Path, target: Path, kind: str) -> None:
    """Replace `target` (absent, or an earlier output of the same kind) with the finished `tmp` folder: a
    rename, so readers never see a partial one (core.ownership.replace)."""
    fsync_tree(tmp)
    ownership.replace(tmp, target, kind)


def discard(tmp: Path) -> None:
    """Remove a staging folder that will not be committed (a failed run's): it only takes space."""
    try:
        ownership.remove(tmp)
    except (OSError, ownership.NotOurs):
        pass


@contextlib.contextmanager
def atomic_dir(target: Path, kind: str):
    """Single-process form: yield a staging folder, commit it on success, remove it on failure."""
    tmp = staging_dir(target, kind)
    try:
        yield tmp
        commit_dir(tmp, target, kind)
    finally:
        discard(tmp)


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
