"""finetune deletes only what finetune made: for every command and every path-valued key or flag, a user's folder
or file at that path survives byte for byte (the command refuses, naming the path and the fix, or writes
elsewhere); and every removal in the package goes through core/ownership.py."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from finetune.recipe import STAGES
from tests.conftest import ROOT, TINY_RECIPE

from .cases import Case, cases, cli, copy_run, refused, snapshot, unchanged

pytestmark = pytest.mark.timeout(900)

NOT_OURS = "was not made by finetune"


def user_folder(path):
    """A folder of the user's at `path` (instead of whatever was there): a file and a subfolder with a file."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my own notes")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "rows.jsonl").write_text('{"mine": true}\n')
    return path


# Every stage's output folder and (for the stages that train) its checkpoints folder, as `finetune <stage>` would
# replace them: a user's folder there is refused before anything loads.
STAGE_PATHS = [
    Case(
        f"{stage}-{what}-is-a-user-folder",
        "ownership",
        f"a user's folder at `<output_dir>/{stage}{suffix}`, then `finetune {stage}`",
        "refused before loading: names the folder, says it was not made by finetune; kept byte for byte",
        (stage, suffix),
    )
    for stage in STAGES.names()
    for what, suffix in (("output", ""), ("checkpoints", "-checkpoints"))
    if not (suffix and STAGES[stage].trl_config is None and not STAGES[stage].memory.rollout)
]


@cases(*STAGE_PATHS)
def test_a_user_folder_where_a_stage_writes_survives(case, small_run, tmp_path, capsys):
    stage, suffix = case.args
    run = copy_run(small_run[0], tmp_path)
    mine = user_folder(run / f"{stage}{suffix}")
    before = snapshot(mine)
    again = [f"{stage}.resume=false"] if suffix else []  # start over: the checkpoints would be emptied
    code, err = cli(capsys, stage, TINY_RECIPE, f"output_dir={run}", *again)
    refused(code, err, str(mine), NOT_OURS)
    unchanged(before, mine)


KEYS = [
    Case(
        "export-output-user-folder",
        "ownership",
        "`export.output=<a user's folder>` with `--force`",
        "refused: not made by finetune; kept",
        ("export", "{mine}", "export.output={mine}", "--force"),
    ),
    Case(
        "export-output-is-output-dir",
        "ownership",
        "`export.output=<output_dir>` with `--force`",
        "refused: the output_dir is no export; every stage output kept",
        ("export", "{run}", "export.output={run}", "--force"),
    ),
    Case(
        "export-output-is-a-stage-output",
        "ownership",
        "`export.output=<output_dir>/sft` with `--force`",
        "refused: made by finetune as the sft stage's output, not an export",
        ("export", "{run}/sft", "export.output={run}/sft", "--force"),
    ),
    Case(
        "export-output-inside-a-stage-output",
        "ownership",
        "`export.output=<output_dir>/sft/merged` with `--force`",
        "refused: lies inside the sft stage's output, which its next run replaces",
        ("export", "{run}/sft", "export.output={run}/sft/merged", "--force"),
    ),
    Case(
        "export-output-contains-the-run",
        "ownership",
        "`export.output=<the folder holding the output_dir>` with `--force`",
        "refused: the user's folder (it holds the run); every stage output kept",
        ("export", "{run}/..", "export.output={run}/..", "--force"),
    ),
    Case(
        "export-output-is-checkpoints",
        "ownership",
        "`export.output=<output_dir>/sft-checkpoints` with `--force`",
        "refused: made by finetune as the sft stage's checkpoints, not an export",
        ("export", "{run}/sft-checkpoints", "export.output={run}/sft-checkpoints", "--force"),
    ),
    Case(
        "eval-output-user-folder",
        "ownership",
        "`eval.output=<a user's folder>`",
        "refused: not made by finetune; kept",
        ("eval", "{mine}", "eval.output={mine}"),
    ),
    Case(
        "eval-output-is-output-dir",
        "ownership",
        "`eval.output=<output_dir>`",
        "refused: the whole run kept",
        ("eval", "{run}", "eval.output={run}"),
    ),
    Case(
        "eval-out-flag-onto-the-run",
        "ownership",
        "`finetune eval <run>/sft --out <run>` (a model folder's flag)",
        "refused before loading: the run kept",
        ("eval-folder", "{run}", "--out", "{run}"),
    ),
    Case(
        "eval-out-flag-user-folder",
        "ownership",
        "`finetune eval MODEL_DIR --out <a user's folder>`",
        "refused before loading: kept",
        ("eval-folder", "{mine}", "--out", "{mine}"),
    ),
    Case(
        "output-dir-is-a-data-folder",
        "ownership",
        "`output_dir=<a data folder with its own eval/ subfolder>`, then `finetune eval`",
        "refused: eval/ there is the user's; every file of the folder kept",
        ("eval-data-folder", "{mine}"),
    ),
    Case(
        "tiny-build-over-a-user-folder",
        "ownership",
        "`finetune tiny build <a user's folder> --force`",
        "refused: not made by finetune; kept",
        ("tiny", "{mine}"),
    ),
]


@cases(*KEYS)
def test_a_user_folder_at_a_path_key_survives(case, small_run, tmp_path, capsys):
    run = copy_run(small_run[0], tmp_path)
    mine = user_folder(tmp_path / "mine")
    command, watched, *rest = case.args
    fill = {"run": run, "mine": mine}
    watched = Path(watched.format(**fill))
    before = snapshot(watched)
    args = [a.format(**fill) for a in rest]
    if command == "eval-folder":
        code, err = cli(capsys, "eval", run / "sft", *args, "--tasks", "finetune_tiny_heldout")
    elif command == "eval-data-folder":
        user_folder(mine / "eval")  # like data/tiny/eval, the tiny lm-eval task
        before = snapshot(mine)
        code, err = cli(capsys, "eval", TINY_RECIPE, f"output_dir={mine}")
    elif command == "tiny":
        from finetune.cli.tiny import main as tiny_main

        capsys.readouterr()
        code = tiny_main(["build", str(mine), "--force", "--steps", "1"])
        err = capsys.readouterr().err
    else:
        code, err = cli(capsys, command, TINY_RECIPE, f"output_dir={run}", *args)
    refused(code, err)
    assert NOT_OURS in err or "was made by finetune as" in err or "lies inside" in err, err[-2000:]
    unchanged(before, watched)


@cases(
    Case(
        "generate-out-is-the-prompts-file",
        "ownership",
        "`finetune generate --prompts p.txt --out p.txt`",
        "refused: the answers would overwrite their own input; p.txt kept",
    ),
    Case(
        "pipeline-force-over-a-user-checkpoints-folder",
        "ownership",
        "a user's folder named `sft-checkpoints` in the output_dir, then `finetune pipeline --force`",
        "the sft stage refuses before loading; the pipeline stops with its status; the folder kept",
    ),
)
def test_inputs_and_forced_reruns_keep_what_is_not_ours(case, small_run, tmp_path, capsys):
    run = copy_run(small_run[0], tmp_path)
    if case.id == "generate-out-is-the-prompts-file":
        prompts = tmp_path / "p.txt"
        prompts.write_text("What is 2 plus 3?\n")
        code, err = cli(capsys, "generate", TINY_RECIPE, f"output_dir={run}", "--prompts", prompts, "--out", prompts)
        refused(code, err, "--out is the prompts file itself")
        assert prompts.read_text() == "What is 2 plus 3?\n"
        return
    mine = user_folder(run / "sft-checkpoints")
    before = snapshot(mine)
    code, err = cli(capsys, "pipeline", TINY_RECIPE, f"output_dir={run}", "pipeline.stages=[sft]", "--force")
    assert code == 2 and str(mine) in err and NOT_OURS in err, err[-3000:]
    unchanged(before, mine)


# Removals outside core/ownership.py, each with why it is not a removal of something the user may own.
ALLOWED = {
    ("finetune/core/outputs.py", "os.replace"): "write_json's own temporary file, renamed over the JSON it writes",
    ("finetune/core/outputs.py", "os.unlink"): "write_json's own temporary file, when the write failed",
    ("finetune/core/tracking.py", "unlink"): "the open-run marker file finetune keeps beside its lock",
    ("finetune/core/tracking.py", "os.replace"): "the open-run marker file, written atomically",
    ("finetune/rl/stage.py", "rename"): "moves files inside its own staging folder (the RL stages' policy adapter)",
    ("finetune/rl/stage.py", "rmdir"): "the subfolder of its own staging folder it moved them out of (empty)",
    ("finetune/core/fingerprints.py", "os.replace"): "its own hash cache file, written atomically",
    (
        "finetune/core/distributed.py",
        "unlink",
    ): "its own probe file (a fresh uuid name) testing whether nodes share a folder",
    ("finetune/deploy/gguf.py", "os.replace"): "llama.cpp's converter into its own cache folder, from a staging copy",
    ("finetune/deploy/gguf.py", "shutil.rmtree"): "its own staging copy of the converter, when another process won",
    ("finetune/deploy/gguf.py", "unlink"): "its own partial GGUF files (.name.partial-*), left by an interrupted run",
}
REMOVING = {"rmtree", "remove", "unlink", "rmdir", "rename", "move", "replace", "removedirs"}


@cases(
    Case(
        "every-removal-goes-through-ownership",
        "ownership",
        "every call in finetune/ that deletes, renames or replaces a file or folder",
        "in core/ownership.py, or listed with its reason (its own temporary files)",
    )
)
def test_every_removal_in_the_package_goes_through_ownership(case):
    found = []
    for path in sorted((ROOT / "finetune").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "finetune/core/ownership.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            if name not in REMOVING or (name == "replace" and owner not in ("os", "shutil")):
                continue  # str.replace, model_copy(update=...)...
            if name == "remove" and owner not in ("os", "shutil"):
                continue  # list.remove
            key = f"{owner}.{name}" if owner in ("os", "shutil") else name
            if (rel, key) not in ALLOWED:
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "removals that bypass core/ownership.py:\n" + "\n".join(found)
