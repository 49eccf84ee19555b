"""core.ownership: finetune removes and replaces only folders it made, of the same kind, and each refusal names
the path and the fix. One test per rule of the module's docstring; each fails if its rule is broken."""

from __future__ import annotations

import json
import os

import pytest

from finetune.core import ownership
from finetune.core.ownership import (
    MARK,
    OUTPUT,
    TINY_BASE,
    NotOurs,
    check_file_target,
    check_target,
    checkpoints_kind,
    clear,
    file_mark,
    kind_of,
    made_before_marks,
    make_output_dir,
    mark,
    new_staging,
    put_file,
    remove,
    remove_file,
    replace,
    stage_kind,
)
from finetune.errors import UserError

SFT, DPO = stage_kind("sft"), stage_kind("dpo")
FIX = "Pick another folder"


def user_folder(path, **files):
    """A folder of the user's (no mark) with `files`; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"notes.txt": "mine"}).items():
        (path / name).write_text(text)
    return path


def ours(path, kind, **files):
    path.mkdir(parents=True, exist_ok=True)
    mark(path, kind)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def staged(tmp_path, target, kind, content="new"):
    tmp = new_staging(target, kind)
    (tmp / "result.txt").write_text(content)
    return tmp


# ----------------------------------------------------------------------------- marks


def test_a_mark_says_the_kind_and_that_finetune_made_it(tmp_path):
    folder = ours(tmp_path / "out", SFT)
    data = json.loads((folder / MARK).read_text())
    assert data["kind"] == SFT and data["made_by"] == "finetune"
    assert kind_of(folder) == SFT


def test_a_mark_not_written_by_finetune_or_damaged_is_no_mark(tmp_path):
    forged = user_folder(tmp_path / "forged")
    (forged / MARK).write_text(json.dumps({"kind": SFT, "made_by": "someone else"}))
    damaged = user_folder(tmp_path / "damaged")
    (damaged / MARK).write_text("{not json")
    assert kind_of(forged) is None and kind_of(damaged) is None
    assert kind_of(tmp_path / "absent") is None and kind_of(forged / "notes.txt") is None  # not a folder
    with pytest.raises(NotOurs):
        remove(forged)


def test_not_ours_is_a_user_error():
    assert issubclass(NotOurs, UserError)  # commands print it as one message, never a traceback


# ----------------------------------------------------------------------------- replace only the same kind


def test_a_stage_output_is_replaced_by_a_run_of_the_same_stage(tmp_path):
    target = ours(tmp_path / "run" / "sft", SFT, **{"result.txt": "old", "extra.txt": "old only"})
    tmp = staged(tmp_path, target, SFT)
    replace(tmp, target, SFT)
    assert (target / "result.txt").read_text() == "new"
    assert not (target / "extra.txt").exists()  # the earlier output went as a whole
    assert kind_of(target) == SFT  # the staging mark became the target's
    assert not tmp.exists()
    assert [p.name for p in target.parent.iterdir()] == ["sft"]  # no staging or old folder left behind


def test_a_folder_made_as_another_kind_is_never_replaced(tmp_path):
    target = ours(tmp_path / "run" / "sft", DPO, **{"result.txt": "dpo's"})
    tmp = staged(tmp_path, target, SFT)
    with pytest.raises(NotOurs) as e:
        replace(tmp, target, SFT, FIX)
    assert str(target) in str(e.value) and "the dpo stage's output, not as the sft stage's output" in str(e.value)
    assert FIX in str(e.value)
    assert (target / "result.txt").read_text() == "dpo's"


def test_a_users_folder_is_never_replaced(tmp_path):
    target = user_folder(tmp_path / "run" / "sft")
    tmp = staged(tmp_path, target, SFT)
    with pytest.raises(NotOurs, match="was not made by finetune"):
        replace(tmp, target, SFT)
    assert (target / "notes.txt").read_text() == "mine" and not (target / MARK).exists()


@pytest.mark.parametrize("kind", [OUTPUT, checkpoints_kind("sft")])
def test_other_kinds_of_ours_are_refused_where_a_stage_writes(tmp_path, kind):
    target = ours(tmp_path / "sft", kind, **{"keep.txt": "x"})
    with pytest.raises(NotOurs, match="was made by finetune as"):
        check_target(target, SFT, FIX)


def test_absent_and_empty_targets_are_fine(tmp_path):
    check_target(tmp_path / "absent", SFT, FIX)
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", SFT, FIX)
    tmp = staged(tmp_path, tmp_path / "empty", SFT)
    replace(tmp, tmp_path / "empty", SFT)
    assert (tmp_path / "empty" / "result.txt").read_text() == "new"


def test_a_file_or_a_link_to_a_file_is_refused_as_a_target(tmp_path):
    (tmp_path / "data.jsonl").write_text("rows")
    (tmp_path / "link").symlink_to(tmp_path / "data.jsonl")
    with pytest.raises(NotOurs, match="is a file, not a folder"):
        check_target(tmp_path / "data.jsonl", SFT, FIX)
    with pytest.raises(NotOurs, match="is a link to something that is not a folder"):
        check_target(tmp_path / "link", SFT, FIX)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotOurs, match="is a link"):
        check_target(tmp_path / "dangling", SFT, FIX)
    assert (tmp_path / "data.jsonl").read_text() == "rows"


# ----------------------------------------------------------------------------- nothing inside a replaced folder


@pytest.mark.parametrize("container", [SFT, checkpoints_kind("sft")])
def test_nothing_is_written_inside_a_folder_that_a_rerun_replaces(tmp_path, container):
    outer = ours(tmp_path / "run" / "sft", container)
    with pytest.raises(NotOurs) as e:
        check_target(outer / "export", stage_kind("export"), FIX)
    assert f"lies inside {outer}" in str(e.value) and FIX in str(e.value)


def test_an_unmarked_checkpoints_folder_of_an_earlier_finetune_is_a_container_too(tmp_path):
    legacy = tmp_path / "run" / "sft-checkpoints"
    legacy.mkdir(parents=True)
    (legacy / "run_identity.json").write_text("{}")
    with pytest.raises(NotOurs, match="lies inside"):
        check_target(legacy / "mine", SFT, FIX)


def test_an_output_dir_and_a_stages_checkpoints_hold_what_belongs_there(tmp_path):
    run = ours(tmp_path / "run", OUTPUT)
    check_target(run / "sft", SFT, FIX)  # a stage's output in an output_dir
    checkpoints = ours(run / "ppo-checkpoints", checkpoints_kind("ppo"))
    check_target(checkpoints / "update-4", "checkpoint:ppo", FIX)  # its own checkpoint
    with pytest.raises(NotOurs, match="lies inside"):
        check_target(checkpoints / "update-4", "checkpoint:dpo", FIX)  # another stage's is not


def test_a_staging_folder_holds_anything(tmp_path):
    tmp = new_staging(tmp_path / "export", stage_kind("export"))
    check_target(tmp / "sub", SFT, FIX)


# ----------------------------------------------------------------------------- output_dir and staging


def test_an_output_dir_is_marked_only_when_finetune_creates_it(tmp_path):
    made = make_output_dir(tmp_path / "new" / "run")
    assert kind_of(made) == OUTPUT
    users = user_folder(tmp_path / "mine")
    make_output_dir(users)
    assert not (users / MARK).exists() and kind_of(users) is None


def test_staging_is_hidden_beside_the_target_marked_and_fresh(tmp_path):
    target = tmp_path / "run" / "sft"
    first = new_staging(target, SFT)
    assert first == tmp_path / "run" / ".sft.tmp" and kind_of(first) == f"{SFT}+staging"
    (first / "half-written.bin").write_text("x")  # a run that stopped
    second = new_staging(target, SFT)
    assert second == first and not (second / "half-written.bin").exists()


def test_a_users_folder_where_staging_goes_is_refused(tmp_path):
    users = user_folder(tmp_path / ".sft.tmp")
    with pytest.raises(NotOurs, match="was not made by finetune"):
        new_staging(tmp_path / "sft", SFT)
    assert (users / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- remove


def test_remove_takes_a_folder_of_ours_of_the_kind_asked(tmp_path):
    remove(tmp_path / "absent")  # a missing path is fine
    folder = ours(tmp_path / "sft", SFT, **{"a.txt": "a"})
    with pytest.raises(NotOurs, match="the sft stage's output"):
        remove(folder, DPO)
    assert folder.is_dir()
    remove(folder, SFT)
    assert not folder.exists()


def test_remove_refuses_a_users_folder_and_names_the_fix(tmp_path):
    users = user_folder(tmp_path / "data")
    with pytest.raises(NotOurs) as e:
        remove(users)
    assert str(users) in str(e.value) and "Move it away yourself" in str(e.value)
    assert (users / "notes.txt").exists()


def test_remove_never_deletes_through_a_link(tmp_path):
    target = ours(tmp_path / "real", SFT, **{"a.txt": "a"})
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(NotOurs, match="is a symbolic link"):
        remove(link)
    assert link.is_symlink() and (target / "a.txt").exists()


# ----------------------------------------------------------------------------- clear


def test_clear_empties_our_folder_and_keeps_it_and_its_mark(tmp_path):
    kind = checkpoints_kind("sft")
    folder = ours(tmp_path / "sft-checkpoints", kind, **{"run_identity.json": "{}"})
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.bin").write_text("w")
    clear(folder, kind)
    assert sorted(p.name for p in folder.iterdir()) == [MARK]
    assert kind_of(folder) == kind
    clear(tmp_path / "absent", kind)  # nothing to clear is fine


def test_clear_follows_a_link_and_keeps_the_link_and_the_folder(tmp_path):
    kind = checkpoints_kind("sft")
    elsewhere = ours(tmp_path / "other-disk" / "ckpts", kind, **{"checkpoint-1": "w"})
    link = tmp_path / "run" / "sft-checkpoints"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    clear(link, kind)
    assert link.is_symlink() and elsewhere.is_dir()
    assert [p.name for p in elsewhere.iterdir()] == [MARK]


def test_clear_refuses_a_linked_folder_that_is_not_ours_and_names_the_link(tmp_path):
    users = user_folder(tmp_path / "users")
    link = tmp_path / "sft-checkpoints"
    link.symlink_to(users)
    with pytest.raises(NotOurs) as e:
        clear(link, checkpoints_kind("sft"))
    assert f"through the link {link}" in str(e.value)
    assert (users / "notes.txt").exists()


def test_clear_does_not_follow_links_inside_the_folder(tmp_path):
    kind = checkpoints_kind("sft")
    users = user_folder(tmp_path / "users")
    folder = ours(tmp_path / "sft-checkpoints", kind)
    (folder / "to-users").symlink_to(users)
    clear(folder, kind)
    assert not (folder / "to-users").exists()
    assert (users / "notes.txt").read_text() == "mine"  # the link went, not what it pointed at


def test_clear_refuses_another_stages_checkpoints(tmp_path):
    folder = ours(tmp_path / "dpo-checkpoints", checkpoints_kind("dpo"), **{"state": "x"})
    with pytest.raises(NotOurs, match="the dpo stage's checkpoints"):
        clear(folder, checkpoints_kind("sft"))
    assert (folder / "state").exists()


# ----------------------------------------------------------------------------- outputs of an earlier finetune


def legacy_stage(folder, **extra):
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text("output_dir: x\n")
    (folder / "metrics.json").write_text(json.dumps({"train_loss": 1.0, **extra}))
    return folder


def test_layouts_of_an_earlier_finetune_are_recognised(tmp_path):
    assert made_before_marks(legacy_stage(tmp_path / "run" / "dpo")) == DPO
    export = legacy_stage(tmp_path / "merged", stage="sft", adapters=["a"])
    (export / "config.json").write_text("{}")
    assert made_before_marks(export) == stage_kind("export")
    scored = tmp_path / "scores"
    scored.mkdir()
    (scored / "metrics.json").write_text("{}")
    (scored / "results.json").write_text("{}")
    assert made_before_marks(scored) == stage_kind("eval")
    ckpts = tmp_path / "run" / "ppo-checkpoints"
    ckpts.mkdir()
    (ckpts / "run_identity.json").write_text("{}")
    assert made_before_marks(ckpts) == checkpoints_kind("ppo")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "build_record.json").write_text("{}")
    (tiny / "model.safetensors").write_bytes(b"")
    assert made_before_marks(tiny) == TINY_BASE
    assert kind_of(export) == stage_kind("export")  # kind_of falls back to the layout


def test_a_users_folder_is_not_mistaken_for_an_earlier_output(tmp_path):
    only_metrics = tmp_path / "a"
    only_metrics.mkdir()
    (only_metrics / "metrics.json").write_text("{}")  # no recipe.yaml / results.json beside it
    damaged = legacy_stage(tmp_path / "b")
    (damaged / "metrics.json").write_text("{oops")
    a_list = legacy_stage(tmp_path / "c")
    (a_list / "metrics.json").write_text("[1, 2]")
    identity = tmp_path / "d"  # run_identity.json outside a -checkpoints folder
    identity.mkdir()
    (identity / "run_identity.json").write_text("{}")
    for folder in (only_metrics, damaged, a_list, identity):
        assert made_before_marks(folder) is None, folder


def test_an_earlier_finetunes_output_is_replaced_by_the_same_stage_and_cleared_ones_get_a_mark(tmp_path):
    target = legacy_stage(tmp_path / "run" / "sft")
    replace(staged(tmp_path, target, SFT), target, SFT)
    assert (target / "result.txt").read_text() == "new" and kind_of(target) == SFT
    ckpts = tmp_path / "run" / "sft-checkpoints"
    ckpts.mkdir()
    (ckpts / "run_identity.json").write_text("{}")
    clear(ckpts, checkpoints_kind("sft"))
    assert json.loads((ckpts / MARK).read_text())["kind"] == checkpoints_kind("sft")


# ----------------------------------------------------------------------------- a file put into our folder


def test_a_file_is_put_only_inside_a_folder_finetune_made_as_that_kind(tmp_path):
    export = ours(tmp_path / "export", stage_kind("export"), **{"model.gguf": "old"})
    (export / "sub").mkdir()
    tmp = tmp_path / "model.gguf.tmp"
    tmp.write_text("new")
    put_file(tmp, export / "model.gguf", stage_kind("export"))
    assert (export / "model.gguf").read_text() == "new" and not tmp.exists()
    tmp.write_text("deeper")
    put_file(tmp, export / "sub" / "x.gguf", stage_kind("export"))  # the nearest marked folder above it counts
    assert (export / "sub" / "x.gguf").read_text() == "deeper"


def test_a_file_is_not_put_among_the_users_or_another_stages_files(tmp_path):
    users = user_folder(tmp_path / "users", **{"model.gguf": "mine"})
    sft = ours(tmp_path / "sft", SFT)
    tmp = tmp_path / "f.tmp"
    tmp.write_text("new")
    with pytest.raises(NotOurs, match="lies in no folder finetune made"):
        put_file(tmp, users / "model.gguf", stage_kind("export"))
    with pytest.raises(NotOurs, match=f"lies in {sft}, the sft stage's output"):
        put_file(tmp, sft / "model.gguf", stage_kind("export"))
    assert (users / "model.gguf").read_text() == "mine" and tmp.exists()


# ----------------------------------------------------------------------------- files among the user's


def test_a_file_finetune_wrote_is_marked_by_a_sidecar_and_only_it_is_removed(tmp_path):
    out = tmp_path / "answers.jsonl"
    assert file_mark(out) == tmp_path / ".answers.jsonl.finetune.json"
    check_file_target(out, FIX)  # absent: fine
    out.write_text("ours\n")
    file_mark(out).write_text("{}")
    check_file_target(out, FIX)
    remove_file(out, FIX)
    assert not out.exists() and not file_mark(out).exists()
    remove_file(out, FIX)  # already gone: fine


def test_a_users_file_or_a_folder_is_refused_as_a_file_target(tmp_path):
    users = tmp_path / "mine.jsonl"
    users.write_text("user's\n")
    with pytest.raises(NotOurs) as e:
        remove_file(users, FIX)
    assert "was not written by finetune" in str(e.value) and FIX in str(e.value)
    assert users.read_text() == "user's\n"
    (tmp_path / "dir").mkdir()
    with pytest.raises(NotOurs, match="is a folder, not a file"):
        check_file_target(tmp_path / "dir", FIX)


def test_a_mark_is_written_atomically(tmp_path):
    folder = ours(tmp_path / "x", SFT)
    mark(folder, DPO)  # re-marking replaces the file; no temporary is left beside it
    assert sorted(os.listdir(folder)) == [MARK] and kind_of(folder) == DPO
    assert ownership.describe(OUTPUT) == "a run's output_dir"
