"""core.integrity: a damaged file one stage reads from another is named with the fix, before anything relies on
it; a torch.save file that pickles code is refused without running it."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from finetune.core.integrity import (
    DamagedFileError,
    check_safetensors,
    read_json,
    safetensors_problem,
    torch_file_problem,
)
from finetune.errors import UserError

FIX = "run the stage again"


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.zeros(4, 3), "b": torch.ones(7)}, str(path))
    return path


def test_a_complete_safetensors_file_passes(weights):
    assert safetensors_problem(weights) is None
    check_safetensors(weights, FIX)


def test_a_truncated_safetensors_file_is_named_with_the_fix(weights):
    data = weights.read_bytes()
    weights.write_bytes(data[:-5])
    assert "truncated" in safetensors_problem(weights)
    with pytest.raises(DamagedFileError) as e:
        check_safetensors(weights, FIX)
    assert str(e.value).startswith(f"{weights}: damaged (") and str(e.value).endswith(f"; {FIX}")
    assert isinstance(e.value, UserError)


def test_bytes_appended_after_the_tensors_are_found(weights):
    weights.write_bytes(weights.read_bytes() + b"\0" * 3)
    assert "extended" in safetensors_problem(weights)


@pytest.mark.parametrize(
    "content, says",
    [
        (b"abc", "shorter than a safetensors header"),
        ((10**6).to_bytes(8, "little") + b"{}", "truncated or not safetensors"),
        ((5).to_bytes(8, "little") + b"{oops", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        (b"\xff" * 64, "truncated or not safetensors"),
    ],
    ids=["short", "header-past-end", "header-not-json", "header-not-object", "noise"],
)
def test_what_is_not_safetensors_is_said(tmp_path, content, says):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    assert says in safetensors_problem(path)


def test_an_unreadable_safetensors_file_is_said(tmp_path):
    assert "cannot read it" in safetensors_problem(tmp_path / "absent.safetensors")


def test_a_complete_torch_file_of_tensors_passes(tmp_path):
    path = tmp_path / "engine.pt"
    torch.save({"step": 3, "state": {"m": torch.ones(2)}, "lr": [1e-3]}, path)
    assert torch_file_problem(path) is None


def test_a_truncated_torch_file_is_said(tmp_path):
    path = tmp_path / "engine.pt"
    torch.save({"m": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    assert "not a complete torch.save archive" in torch_file_problem(path)


def test_a_torch_file_with_a_corrupt_member_fails_its_crc(tmp_path):
    path = tmp_path / "engine.pt"
    tensor = torch.arange(64, dtype=torch.float32)
    torch.save({"m": tensor}, path)
    data = bytearray(path.read_bytes())
    start = data.index(tensor.numpy().tobytes())
    data[start + 10] ^= 0xFF  # one byte of the stored tensor flipped
    path.write_bytes(bytes(data))
    assert "fails its CRC check" in torch_file_problem(path)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    payload = Payload()
    payload.marker = marker
    path = tmp_path / "rng_0.pt"
    torch.save({"state": payload}, path)
    problem = torch_file_problem(path)
    assert problem is not None and "which a weights-only load refuses" in problem
    assert "system" in problem  # the global it would call is named
    assert not marker.exists()


def test_a_class_outside_torchs_allowlist_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "optimizer.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, path)
    assert "argparse.Namespace" in torch_file_problem(path)
    assert torch_file_problem(path, allowed=(argparse.Namespace,)) is None


def test_read_json_parses_and_names_where_a_damaged_file_breaks(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"loss": 1.5}))
    assert read_json(path, FIX) == {"loss": 1.5}
    path.write_text('{\n  "loss": 1.5,\n  oops\n}')
    with pytest.raises(DamagedFileError) as e:
        read_json(path, FIX)
    assert str(e.value).startswith(f"{path}: damaged (not valid JSON: ") and "line 3, column 3" in str(e.value)
    assert str(e.value).endswith(FIX)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(DamagedFileError, match=r"not UTF-8 text at byte 7"):
        read_json(path, FIX)
