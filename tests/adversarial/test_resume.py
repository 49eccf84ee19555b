"""Resume: a checkpoint continues only its own run; damaged or unsafe checkpoints are never loaded."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE, write_jsonl

from .cases import (
    EXTRA_ROWS,
    Case,
    cases,
    cli,
    copy_run,
    refused,
    snapshot,
    unchanged,
)

pytestmark = pytest.mark.timeout(900)


# ============================================================================= resume


def sft_again(capsys, run: Path, overrides: list[str], *extra: str) -> tuple[int, str]:
    return cli(capsys, "sft", TINY_RECIPE, f"output_dir={run}", *overrides, *extra)


RESUME_CASES = [
    Case(
        "resume-other-learning-rate",
        "resume",
        "rerun sft with another learning rate",
        "refused: names sft.learning_rate old -> new and `sft.resume=false`",
        ("training.learning_rate=1e-3",),
    ),
    Case(
        "resume-other-data",
        "resume",
        "rerun sft with one training row changed",
        "refused: names sft.data (rows fingerprint) and `sft.resume=false`",
        (),
    ),
    Case("resume-other-lora", "resume", "rerun sft with `lora.r=8`", "refused: names lora.r 16 -> 8", ("lora.r=8",)),
    Case(
        "resume-past-max-steps",
        "resume",
        "rerun sft with max_steps below the checkpoint's step",
        "refused: nothing left to train",
        ("sft.max_steps=1",),
    ),
]


@cases(*RESUME_CASES)
def test_resume_refuses_a_checkpoint_of_other_inputs(case, small_run, tmp_path, capsys):
    run = copy_run(small_run[0], tmp_path)
    overrides = list(small_run[1])
    extra = list(case.args)
    if case.id == "resume-other-data":
        extra_rows = [EXTRA_ROWS[0], {**EXTRA_ROWS[1], "answer": "2"}]  # the over-long row changed: still dropped
        changed = write_jsonl(tmp_path / "extra.jsonl", extra_rows)
        overrides = [o if not o.startswith("sft.data.train=") else o.rsplit("{path:", 1)[0] for o in overrides]
        overrides = [o + f"{{path: {changed}}}]" if o.startswith("sft.data.train=") else o for o in overrides]
    before = snapshot(run)
    code, err = sft_again(capsys, run, overrides, *extra)
    must = {
        "resume-other-learning-rate": ["sft.resume: the checkpoints in", "sft.learning_rate: 0.002 -> 0.001"],
        "resume-other-data": ["sft.data (the training rows): 165 rows (sha256"],
        "resume-other-lora": ["lora.r: 16 -> 8"],
        "resume-past-max-steps": ["it is at step 2, past sft.max_steps 1", "nothing left to train"],
    }[case.id]
    refused(code, err, *must, "sft.resume=false")
    unchanged(before, run)


@cases(
    Case(
        "checkpoint-without-trainer-state",
        "faults",
        "newest HF checkpoint lacks trainer_state.json (killed mid-save)",
        "skipped and named; resumes from the newest complete one and says which",
    ),
    Case(
        "checkpoint-truncated-adapter",
        "faults",
        "newest HF checkpoint's adapter truncated (disk full mid-save)",
        "skipped and named; resumes from the older complete one",
    ),
    Case(
        "checkpoint-truncated-optimizer",
        "faults",
        "newest HF checkpoint's optimizer.pt truncated",
        "skipped: not a complete torch.save archive",
    ),
    Case(
        "checkpoint-pickle-payload",
        "security",
        "a crafted pickle (os.system) as rng_state.pth of an HF checkpoint",
        "never unpickled: the checkpoint is skipped, naming the global it would call",
    ),
)
def test_damaged_trainer_checkpoints_are_skipped_for_the_newest_complete(case, small_run, tmp_path, caplog):
    from finetune.core.resume import choose_checkpoint, run_identity
    from finetune.recipe import load_recipe

    run = copy_run(small_run[0], tmp_path)
    newest = run / "sft-checkpoints" / "checkpoint-2"
    if case.id == "checkpoint-without-trainer-state":
        (newest / "trainer_state.json").unlink()
    elif case.id == "checkpoint-truncated-adapter":
        with (newest / "adapter_model.safetensors").open("r+b") as fh:
            fh.truncate(8000)  # past its header: the size check finds it
    elif case.id == "checkpoint-truncated-optimizer":
        with (newest / "optimizer.pt").open("r+b") as fh:
            fh.truncate(4096)
    else:
        (newest / "rng_state.pth").write_bytes(pickle_payload(tmp_path / "pwned"))
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={run}", *small_run[1]])
    from finetune.core.data import train_eval_rows

    rows = train_eval_rows(recipe.sft.data, recipe, recipe.seed)[0]
    caplog.set_level(logging.INFO)
    chosen = choose_checkpoint(recipe, "sft", True, run_identity(recipe, "sft", rows))
    assert chosen == run / "sft-checkpoints" / "checkpoint-1"
    why = {
        "checkpoint-without-trainer-state": "checkpoint-2 (no trainer_state.json (written last)",
        "checkpoint-truncated-adapter": "checkpoint-2 (adapter_model.safetensors: 8000 bytes where its header",
        "checkpoint-truncated-optimizer": "checkpoint-2 (optimizer.pt: not a complete torch.save archive",
        "checkpoint-pickle-payload": "checkpoint-2 (rng_state.pth: it pickles posix.system",
    }[case.id]
    assert why in caplog.text, caplog.text
    assert "resuming sft from" in caplog.text and "checkpoint-1 (the newest complete checkpoint" in caplog.text
    assert not (tmp_path / "pwned").exists()


@cases(
    Case(
        "resume-after-damage-end-to-end",
        "faults",
        "rerun sft after its newest checkpoint lost trainer_state.json",
        "exit 0: resumed from checkpoint-1 (said), trained step 2 again, output complete",
    ),
)
def test_a_rerun_after_a_half_written_checkpoint_finishes_from_the_older_one(case, small_run, tmp_path, capsys):
    run = copy_run(small_run[0], tmp_path)
    (run / "sft-checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()
    code, err = sft_again(capsys, run, small_run[1])
    assert code == 0, err[-3000:]
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-1") and metrics["global_steps"] == 2
    state = json.loads((run / "sft-checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2]


def pickle_payload(sentinel: Path) -> bytes:
    """A torch.save-format archive whose pickle calls os.system (writes `sentinel`) when unpickled."""
    import io

    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    buf = io.BytesIO()
    torch.save({"cpu": Payload()}, buf)
    return buf.getvalue()


def fake_ppo_checkpoint(folder: Path, update: int) -> None:
    """A complete PPO checkpoint as finetune.rl.checkpoints.save lays it out (small tensors)."""
    import torch
    from safetensors.torch import save_file

    from finetune.rl.checkpoints import _rng_state

    folder.mkdir(parents=True)
    save_file({"policy.w": torch.zeros(4), "value_head.w": torch.ones(2)}, str(folder / "weights.safetensors"))
    torch.save({"policy": {"state": {}, "param_groups": []}, "beta": 0.05}, folder / "engine.pt")
    torch.save(_rng_state(), folder / "rng_0.pt")
    (folder / "state.json").write_text(json.dumps({"update": update, "norm": None, "world_size": 1}))


@cases(
    Case(
        "ppo-checkpoint-pickle-payload",
        "security",
        "a crafted pickle (os.system) as engine.pt of the newest PPO checkpoint",
        "never unpickled: skipped with the global named; resume takes the older one",
    ),
    Case(
        "ppo-checkpoint-truncated",
        "faults",
        "the newest PPO checkpoint's weights.safetensors truncated",
        "skipped and named; resume takes the older one",
    ),
)
def test_ppo_checkpoints_with_payloads_or_damage_are_never_loaded(case, tmp_path, caplog):
    from finetune.core.resume import choose_checkpoint
    from finetune.recipe import load_recipe
    from finetune.rl import checkpoints

    recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}"])
    root = recipe.checkpoint_dir("ppo")
    fake_ppo_checkpoint(root / "update-2", 2)
    fake_ppo_checkpoint(root / "update-4", 4)
    identity = {"a": 1}
    (root / "run_identity.json").write_text(json.dumps(identity))
    if case.id == "ppo-checkpoint-pickle-payload":
        (root / "update-4" / "engine.pt").write_bytes(pickle_payload(tmp_path / "pwned"))
        why = "update-4 (engine.pt: it pickles posix.system"
    else:
        with (root / "update-4" / "weights.safetensors").open("r+b") as fh:
            fh.truncate(40)
        why = "update-4 (weights.safetensors: "
    caplog.set_level(logging.INFO)
    chosen = choose_checkpoint(
        recipe,
        "ppo",
        True,
        identity,
        prefix=checkpoints.PREFIX,
        problem=checkpoints.problem,
        beyond=checkpoints.beyond(10),
    )
    assert chosen == root / "update-2" and why in caplog.text, caplog.text
    assert not (tmp_path / "pwned").exists()


@cases(
    Case(
        "no-unsafe-loads-in-the-code",
        "security",
        "every torch.load / pickle load in finetune/",
        "torch.load always with weights_only=True; no pickle/dill/joblib loads; trust_remote_code off by default",
    ),
)
def test_nothing_in_the_package_unpickles_code(case):
    import re

    from finetune.recipe.sections import ModelSection

    offenders = []
    for path in (ROOT / "finetune").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)[:60]}")
        if re.search(r"\b(pickle|dill|joblib|cloudpickle)\.loads?\(", text):
            offenders.append(f"{path.relative_to(ROOT)}: pickle load")
    assert not offenders, offenders
    assert ModelSection.model_fields["trust_remote_code"].default is False


def fake_fsdp_checkpoint(folder: Path, step: int) -> None:
    """A Trainer checkpoint as FSDP2 with sharded state dicts lays it out: torch.distributed.checkpoint folders
    for the model and optimiser (written here by DCP itself, in one process), scheduler, trainer state."""
    import torch
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True)
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(folder / part))
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


@cases(
    Case(
        "fsdp-checkpoint-index-payload",
        "security",
        "a crafted pickle (os.system) as the DCP index (.metadata) of the newest FSDP checkpoint",
        "never unpickled (read with an allowlist): skipped with the global named; the older one is checked and taken",
    ),
    Case(
        "deepspeed-checkpoint-without-latest",
        "faults",
        "the newest DeepSpeed checkpoint has its states but no `latest` file (a save cut short, or a node DeepSpeed "
        "wrote none for)",
        "skipped and named; resume takes the older one",
    ),
)
def test_sharded_checkpoints_are_checked_before_loading(case, tmp_path):
    import pickle

    from finetune.core.resume import hf_checkpoint_problem

    older, newest = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    fake_fsdp_checkpoint(older, 2)
    assert hf_checkpoint_problem(older) is None  # a complete sharded checkpoint, its real DCP index accepted
    if case.id == "fsdp-checkpoint-index-payload":
        fake_fsdp_checkpoint(newest, 4)

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        (newest / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(Payload()))
        assert "optimizer_0/.metadata: it pickles posix.system" in hf_checkpoint_problem(newest)
        assert not (tmp_path / "pwned").exists()
    else:
        newest.mkdir()
        (newest / "global_step4").mkdir()
        (newest / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
        (newest / "adapter_model.safetensors").write_bytes(b"")
        assert "`latest` file" in hf_checkpoint_problem(newest)
