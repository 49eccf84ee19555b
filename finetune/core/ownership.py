"""finetune deletes only what finetune made: every folder it creates carries a mark, and one set of functions
here does every removal and replacement, for every command, refusing anything without the mark.

A mark is a small JSON file `.finetune` inside the folder: what kind of folder it is (a stage's output, a
stage's checkpoints, a staging folder, a run's output_dir) and who made it. Kinds:

  output              an output_dir finetune created: a container, never removed or replaced
  stage:<name>        a stage's output (`<output_dir>/<stage>`, export.output, eval.output, eval --out):
                      replaced only by a run of the same stage
  checkpoints:<name>  a stage's checkpoints (`<output_dir>/<stage>-checkpoints`): emptied only by that stage
                      (`<stage>.resume=false`, `--force`)
  checkpoint:<name>   one checkpoint inside them (PPO's `update-N`)
  tiny-base           the tiny base `finetune tiny build OUT` writes (finetune/tiny/base ships one)
  <kind>+staging      a hidden staging folder beside the target, renamed into place once complete

A file finetune writes next to user files (`finetune generate --out`) is marked by a sidecar
`.<name>.finetune.json` beside it. Outputs of an earlier finetune that predate marks are recognised by their
layout (`made_before_marks`), so upgrading does not strand a run.

Why a mark and not a rule on paths: the mistakes that lost data were all a path that happened to be the
user's (an output_dir pointed at a data folder, `eval --out` at a run, a user folder named like a stage). A
path says where, not whose; the mark says whose.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe import STAGES

MARK = ".finetune"
OUTPUT = "output"
TINY_BASE = "tiny-base"


class NotOurs(UserError):
    """A path finetune would remove or replace that it did not make; the message names it and the fix."""


def stage_kind(stage: str) -> str:
    return f"stage:{stage}"


def checkpoints_kind(stage: str) -> str:
    return f"checkpoints:{stage}"


def _write_mark(folder: Path, kind: str) -> None:
    data = {"kind": kind, "made_by": "finetune", "pid": os.getpid(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = folder / f"{MARK}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, folder / MARK)


def mark(folder: str | Path, kind: str) -> Path:
    """Mark `folder` (which finetune has just made) as finetune's, of `kind`."""
    folder = Path(folder)
    _write_mark(folder, kind)
    return folder


def made_before_marks(folder: Path) -> str | None:
    """The kind of an output an earlier finetune wrote before folders were marked, recognised by its layout
    (every file finetune writes last to mark a complete output), or None."""
    if (folder / "build_record.json").is_file() and (folder / "model.safetensors").is_file():
        return TINY_BASE  # what the tiny build writes; the shipped base carries no mark (package data)
    if (folder / "run_identity.json").is_file() and folder.name.endswith("-checkpoints"):
        return checkpoints_kind(folder.name.removesuffix("-checkpoints"))
    metrics = folder / "metrics.json"
    if metrics.is_file() and ((folder / "recipe.yaml").is_file() or (folder / "results.json").is_file()):
        try:
            data = json.loads(metrics.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict):
            if (folder / "config.json").is_file() and {"stage", "adapters"} <= set(data):
                return stage_kind("export")
            if (folder / "results.json").is_file():
                return stage_kind("eval")
            return stage_kind(folder.name)
    return None


def kind_of(path: str | Path) -> str | None:
    """What finetune made `path` as (its mark, or the layout of an earlier finetune's output), or None."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    try:
        data = json.loads((folder / MARK).read_text())
    except FileNotFoundError:
        return made_before_marks(folder)
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("made_by") == "finetune" else None


def _refuse(path: Path, what: str, fix: str) -> NotOurs:
    return NotOurs(f"{path}: {what}; finetune removes and replaces only folders it made (marked with {MARK}). {fix}")


def _empty(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def check_target(target: str | Path, kind: str, fix: str) -> None:
    """Refuse, before any work, a target a run of `kind` would replace that finetune did not make as that kind:
    a file, a folder of the user's (not empty), a folder finetune made as something else, or a folder lying
    inside one finetune replaces (a stage's output or checkpoints: the next run of that stage would take it
    with it). Absent and empty targets are fine. `fix` says what to do instead."""
    target = Path(target)
    if target.is_symlink() and not target.is_dir():
        raise _refuse(target, "is a link to something that is not a folder", fix)
    if target.exists() and not target.is_dir():
        raise _refuse(target, "is a file, not a folder", fix)
    if target.is_dir() and not _empty(target):
        found = kind_of(target)
        if found is None:
            raise _refuse(target, "exists and was not made by finetune (no mark)", fix)
        if found != kind:
            raise _refuse(target, f"was made by finetune as {describe(found)}, not as {describe(kind)}", fix)
    for parent in target.resolve().parents:
        # a marked folder; or one an earlier finetune wrote, recognised by its layout where its name says it may be
        # one (a stage's name, `-checkpoints`): other folders with a metrics.json are not taken for outputs
        named = parent.name in STAGES or parent.name.endswith("-checkpoints")
        found = kind_of(parent) if (parent / MARK).exists() or named else None
        if found is None or found == OUTPUT or found.endswith("+staging"):
            continue
        if found.startswith("checkpoints:") and kind == f"checkpoint:{found.partition(':')[2]}":
            continue  # a stage's checkpoint, in its checkpoints folder
        raise _refuse(
            target, f"lies inside {parent}, {describe(found)}, which finetune replaces when that runs again", fix
        )


def describe(kind: str) -> str:
    if kind == OUTPUT:
        return "a run's output_dir"
    what, _, name = kind.partition(":")
    name = name.removesuffix("+staging")
    if what == "stage":
        return f"the {name} stage's output"
    if what == "checkpoints":
        return f"the {name} stage's checkpoints"
    return kind


def make_output_dir(folder: str | Path) -> Path:
    """Create an output_dir (marking it only when finetune creates it: an existing folder, e.g. one of the
    user's, is written into but never removed)."""
    folder = Path(folder)
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        mark(folder, OUTPUT)
    return folder


def new_staging(target: str | Path, kind: str) -> Path:
    """A fresh hidden staging folder beside `target` (`.<name>.tmp`), marked, for a run of `kind` to write
    into before `replace`. An earlier one (a run that stopped) is removed first, if finetune made it."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists() or tmp.is_symlink():
        remove(tmp)
    tmp.mkdir(parents=True)
    mark(tmp, f"{kind}+staging")
    return tmp


def replace(tmp: str | Path, target: str | Path, kind: str, fix: str = "") -> None:
    """Put the finished staging folder `tmp` at `target` (rename: readers never see a partial one), replacing an
    earlier output of the same `kind` only. The mark inside becomes the target's."""
    tmp, target = Path(tmp), Path(target)
    check_target(target, kind, fix or "Choose another output folder, or move that one away yourself")
    mark(tmp, kind)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)  # the earlier output, checked above to be this kind's
    else:
        os.replace(tmp, target)


def remove(path: str | Path, kind: str | None = None) -> None:
    """Remove a folder finetune made (of `kind`, when given); refuse anything else. A missing path is fine."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():
        raise _refuse(path, "is a symbolic link", "Remove the link yourself (finetune does not delete through links)")
    found = kind_of(path)
    if found is None or (kind is not None and found != kind):
        what = "was not made by finetune (no mark)" if found is None else f"was made by finetune as {describe(found)}"
        raise _refuse(path, what, "Move it away yourself if it should go")
    shutil.rmtree(path)


def clear(folder: str | Path, kind: str) -> None:
    """Empty a folder finetune made as `kind` (a stage's checkpoints), keeping the folder and its mark. A link to
    such a folder (checkpoints kept on another disk) is followed: the link and the folder stay, emptied."""
    folder = Path(folder)
    if not folder.exists():
        return
    real = folder.resolve()
    found = kind_of(real)
    if found != kind:
        what = "was not made by finetune (no mark)" if found is None else f"was made by finetune as {describe(found)}"
        link = f" (through the link {folder})" if folder.is_symlink() else ""
        raise _refuse(real, f"{what}{link}", "Move it away yourself, or point the stage at another output_dir")
    for child in real.iterdir():
        if child.name == MARK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if not (real / MARK).exists():  # an earlier finetune's folder (recognised by its layout) is marked now
        mark(real, kind)


def put_file(tmp: str | Path, path: str | Path, kind: str) -> None:
    """Rename a finished temporary file to `path`, inside a folder finetune made as `kind` (the nearest marked
    folder above it), replacing the file there; refuse when that folder is not finetune's `kind`."""
    tmp, path = Path(tmp), Path(path)
    owner = next((p for p in path.resolve().parents if (p / MARK).exists() or made_before_marks(p)), None)
    found = kind_of(owner) if owner is not None else None
    if found != kind:
        what = "lies in no folder finetune made" if found is None else f"lies in {owner}, {describe(found)}"
        raise _refuse(path, what, "Write it inside the output finetune made for it")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- files among the user's


def file_mark(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.finetune.json")


def check_file_target(path: str | Path, fix: str) -> None:
    """Refuse to replace a file finetune did not write (no sidecar mark beside it)."""
    path = Path(path)
    if path.is_dir():
        raise _refuse(path, "is a folder, not a file", fix)
    if path.exists() and not file_mark(path).is_file():
        raise _refuse(path, "exists and was not written by finetune", fix)


def remove_file(path: str | Path, fix: str) -> None:
    """Remove a file finetune wrote (its sidecar mark beside it), with its mark; refuse any other file."""
    path = Path(path)
    if not path.exists():
        return
    check_file_target(path, fix)
    path.unlink()
    file_mark(path).unlink(missing_ok=True)
