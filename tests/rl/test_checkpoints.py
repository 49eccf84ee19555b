"""rl.checkpoints: a checkpoint is complete or absent, round-trips everything a run continues from (a resumed run
takes the same next step as one never stopped), is checked before anything loads (a damaged or unsafe file is
named, never half-applied), and only the newest `keep` stay. Tiny random models built in code
(tests/rl/test_engine.py's helpers), CPU."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from finetune.core.ownership import kind_of
from finetune.recipe import RecipeError
from finetune.rl.checkpoints import beyond, load, problem, save
from tests.rl.test_engine import engine, make_model, prompts

NORM = {"mean": 0.25, "std": 1.5}


SMALL = dict(adaptive_kl=True, ppo_epochs=1)  # one pass per rollout: the state to restore, at the least cost


def step(eng, seed):
    """One PPO update on 4 prompts; its figures, less the timings."""
    stats = eng.step(*prompts(n=4, seed=seed))
    return {k: v for k, v in stats.items() if not k.startswith("time_")}


def untrained():
    model = make_model()
    return model, engine(model, **SMALL)


def weights(model) -> dict:
    return {
        n: p.detach().clone()
        for n, p in [*model.peft.named_parameters(), *model.value_head.named_parameters()]
        if "lora_" in n or n in ("weight", "bias")
    }


@pytest.fixture()
def root(tmp_path):
    return tmp_path / "run" / "ppo-checkpoints"


def test_a_resumed_run_takes_the_same_next_step_as_one_never_stopped(root):
    model, eng = untrained()
    step(eng, 0)  # one update in: optimiser moments, a moved policy and value, an adapted beta
    save(root, 1, model, eng, NORM)
    unbroken = step(eng, 1)  # sampling draws on the RNG saved with the checkpoint

    torch.manual_seed(123)  # as a fresh process: another RNG position
    fresh_model, fresh = untrained()
    assert load(root / "update-1", fresh_model, fresh) == (1, NORM)
    assert step(fresh, 1) == unbroken
    for name, value in weights(model).items():
        assert torch.equal(weights(fresh_model)[name], value), name


def test_every_random_state_is_restored(root):
    model, eng = untrained()
    save(root, 1, model, eng, None)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    load(root / "update-1", model, eng)
    assert torch.equal(torch.rand(3), after[0]) and random.random() == after[1] and np.random.rand() == after[2]


def test_a_checkpoint_is_complete_or_absent_and_only_the_newest_stay(root):
    model, eng = untrained()
    for update in (1, 2, 3):
        save(root, update, model, eng, NORM, keep=2)
    assert sorted(os.listdir(root)) == ["update-2", "update-3"]  # no staging folder left behind either
    assert kind_of(root / "update-3") == "checkpoint:ppo"
    assert problem(root / "update-3") is None
    assert json.loads((root / "update-3" / "state.json").read_text())["update"] == 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "ppo-checkpoints"
    model, eng = untrained()
    save(root, 4, model, eng, NORM)
    return root / "update-4"


@pytest.fixture()
def copy(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "ppo-checkpoints" / "update-4"
    shutil.copytree(checkpoint, folder)
    return folder


def test_a_missing_state_file_means_incomplete(copy):
    (copy / "state.json").unlink()
    assert problem(copy) == "no state.json (written last): incomplete"
    assert problem(copy.parent / "update-9") == "no state.json (written last): incomplete"  # absent: the same


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda f: (f / "state.json").write_text("{"), "state.json is damaged"),
        (lambda f: (f / "state.json").write_text('{"update": 5}'), "state.json says update 5, the folder name says 4"),
        (
            lambda f: (f / "weights.safetensors").write_bytes((f / "weights.safetensors").read_bytes()[:-9]),
            "weights.safetensors: ",
        ),
        (lambda f: (f / "engine.pt").unlink(), "no engine.pt"),
        (lambda f: (f / "engine.pt").write_bytes((f / "engine.pt").read_bytes()[:300]), "engine.pt: not a complete"),
        (lambda f: (f / "rng_0.pt").unlink(), "no rng_0.pt"),
    ],
    ids=["state-damaged", "state-other-update", "weights-truncated", "no-engine", "engine-truncated", "no-rng"],
)
def test_a_damaged_checkpoint_is_named_before_anything_loads(copy, damage, says):
    damage(copy)
    assert says in problem(copy)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_payload_in_a_checkpoint_is_refused(copy):
    torch.save({"python": Payload()}, copy / "rng_0.pt")
    found = problem(copy)
    assert found.startswith("rng_0.pt: it pickles") and "system" in found


def test_resuming_with_another_process_count_is_refused_with_the_fix(copy):
    state = json.loads((copy / "state.json").read_text())
    (copy / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    model = make_model()
    with pytest.raises(RecipeError) as e:
        load(copy, model, engine(model))
    assert str(e.value) == (
        f"{copy}: saved by 2 processes, resumed with 1; resume with the same process count or set ppo.resume=false"
    )


def test_a_checkpoint_past_the_updates_asked_for_is_named(copy):
    assert beyond(4)(copy) is None
    assert beyond(3)(copy) == "it is at update 4, past ppo.updates 3"
