"""core.faults: a full disk, a read-only or a forbidden folder, however a library raises it, is one line naming
what happened, where, and what to do; anything else is left to the caller (None)."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest

from finetune.core.faults import DISK_FULL_TEXTS, NEARLY_FULL_BYTES, WRITE_FAILED_TEXTS, describe

Usage = namedtuple("Usage", "total used free")


def raised_from(cause: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as e:
        return e


def raised_during(cause: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException:
            raise outer  # noqa: B904 - the implicit chain (__context__) is what this test is about
    except BaseException as e:
        return e


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_names_the_folder_the_file_and_the_way_on(tmp_path, code):
    file = tmp_path / "sft" / "model.safetensors"
    message = describe(OSError(code, "No space left on device", str(file)), tmp_path)
    assert message.startswith(f"no space left on the device of {tmp_path} writing {file} (")
    assert " free)" in message  # how much room there is now
    assert "set output_dir to a disk with room" in message and "resumes from its last complete checkpoint" in message


def test_a_read_only_file_system_is_said(tmp_path):
    message = describe(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), tmp_path)
    assert message == "cannot write /mnt/ro/run: it is on a read-only file system; use a writable output_dir"
    unnamed = describe(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert unnamed.startswith(f"cannot write {tmp_path}: it is on a read-only file system")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_permission_denied_names_the_file(tmp_path, code):
    message = describe(PermissionError(code, "Permission denied", "/srv/run/sft"), tmp_path)
    assert message == "cannot write /srv/run/sft: permission denied; use an output_dir you may write to"


def test_permission_denied_without_a_file_is_not_guessed_at(tmp_path):
    assert describe(PermissionError(errno.EACCES, "Permission denied"), tmp_path) is None


@pytest.mark.parametrize("text", DISK_FULL_TEXTS)
def test_the_texts_libraries_use_for_a_full_disk_are_recognised(tmp_path, text):
    error = RuntimeError(f"SafetensorError: Error while serializing: {text.upper()} something")
    assert describe(error, tmp_path).startswith(f"no space left on the device of {tmp_path} (")


def test_the_error_is_found_anywhere_in_the_chain(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    assert describe(raised_from(full, RuntimeError("saving the checkpoint failed")), tmp_path) is not None
    assert describe(raised_during(full, ValueError("while cleaning up")), tmp_path) is not None


@pytest.mark.parametrize("text", WRITE_FAILED_TEXTS)
def test_a_failed_write_is_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path, monkeypatch, text):
    error = RuntimeError(f"[enforce fail at inline_container.cc:664] . PytorchStreamWriter {text}")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12, 10**12))
    assert describe(error, tmp_path) is None  # plenty of room: some other failure, not ours to name
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12, NEARLY_FULL_BYTES // 2))
    assert describe(error, tmp_path) == (
        f"no space left on the device of {tmp_path} (8.0 MiB free). Free some space or set output_dir to a disk "
        "with room, then rerun the same command: what was complete is kept (outputs and checkpoints count only "
        "once fully written) and the run resumes from its last complete checkpoint"
    )


def test_the_free_space_is_asked_of_the_nearest_existing_folder(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: asked.append(p) or Usage(1, 1, 3 * 2**30))
    message = describe(OSError(errno.ENOSPC, "full"), tmp_path / "run" / "not-yet")  # output_dir not made yet
    assert asked == [tmp_path] and "(3.0 GiB free)" in message


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        OSError(errno.ENOENT, "No such file or directory", "x"),
        RuntimeError("CUDA out of memory"),
        KeyboardInterrupt(),
    ],
    ids=["value", "missing-file", "oom", "ctrl-c"],
)
def test_other_errors_are_left_to_the_caller(tmp_path, error):
    assert describe(error, tmp_path) is None


def test_a_chain_that_loops_ends(tmp_path):
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert describe(a, tmp_path) is None
