"""Two "nodes" on one machine (`accelerate launch --num_machines 2 --machine_rank 0|1`, one CPU process each),
every training stage in one launched run per node (tests/stages/launched.py), then a resumed SFT and PPO:

- ZeRO-3 with an output folder on each node's own disk (as Azure ML's node-local code snapshot is): both nodes
  end with the same complete outputs and checkpoints, resume from their own copies, and node 2's adapter is not
  the empty one a ZeRO-3 save gives a second node (trl#4416);
- FSDP2 with one folder both nodes share: written once, resumed from the sharded (DCP) checkpoint.

Each run also proves its scheme with 2 processes (sharded files on disk), saves non-empty adapters of the
shapes a 1-process run saves, and exports with logit parity. docs/azureml.md, "Several nodes", says what was run.
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import load_recipe
from tests.conftest import ROOT, TINY_RECIPE, subprocess_env

pytestmark = pytest.mark.timeout(1200)

QUICK = [
    "samples.count=0",
    "training.per_device_train_batch_size=4",
    "training.per_device_eval_batch_size=8",
    "training.warmup_steps=0",
    "training.save_steps=1",
    "sft.max_steps=2",
    "sft.eval_generate_rows=0",
    "sft.data.max_eval_rows=8",
    "reward.max_steps=2",
    "reward.data.max_eval_rows=8",
    "dpo.max_steps=2",
    "dpo.eval_generate_rows=0",
    "dpo.data.max_eval_rows=8",
    "dpo.precompute_ref_log_probs=false",  # not with several processes (finetune/dpo.py)
    "ppo.updates=1",
    "ppo.save_every=1",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batches=1",
    "ppo.micro_batch_size=4",
    "ppo.ppo_epochs=1",
    "ppo.response_length=4",
    "ppo.eval_generate_rows=0",
    "ppo.eval_prompts=0",
]
# every training stage, then SFT and PPO again with a longer run: each continues from its checkpoint
PLAN = "sft,reward,dpo,ppo,sft+sft.max_steps=3,ppo+ppo.updates=2"
TRAINED = ("sft", "reward", "dpo", "ppo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(root, config: str, output_dir: str, *overrides) -> list:
    """Launch node 0 and node 1 together, each from its own working directory (root/node0, root/node1), and
    wait for both. A relative output_dir is then each node's own folder; an absolute one is shared."""
    port, procs = free_port(), []
    for rank in (0, 1):
        cwd = root / f"node{rank}"
        cwd.mkdir(parents=True)
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "recipes/accelerate" / config),
            "--num_processes=2",
            "--num_machines=2",
            f"--machine_rank={rank}",
            "--main_process_ip=127.0.0.1",
            f"--main_process_port={port}",
            str(ROOT / "tests/stages/launched.py"),
            PLAN,
            str(TINY_RECIPE),
            f"output_dir={output_dir}",
            *QUICK,
            *overrides,
        ]
        log = open(root / f"node{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=1100) for p in procs]
    logs = [(root / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], "\n".join(
        f"node {r} (exit {c}):\n{log[-3000:]}" for r, (c, log) in enumerate(zip(codes, logs))
    )
    return logs


@pytest.fixture(scope="module")
def zero3_node_local(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3_nodes")
    logs = two_nodes(root, "deepspeed_zero3_cpu.yaml", "runs/two", "deepspeed=deepspeed/zero3.json")
    return root, [root / f"node{rank}" / "runs/two" for rank in (0, 1)], logs


@pytest.fixture(scope="module")
def fsdp_shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_nodes")
    shared = root / "shared" / "two"
    logs = two_nodes(root, "fsdp2_cpu.yaml", str(shared))
    return root, shared, logs


def metrics(folder, stage) -> dict:
    return json.loads((folder / stage / "metrics.json").read_text())


def node_independent(m: dict) -> dict:
    """A stage's metrics less the one thing that names the node's own folder: the absolute path recorded beside
    each relative lineage path (the relative path and the content hash stay)."""
    return {**m, "start_from": [{k: v for k, v in r.items() if k != "absolute"} for r in m.get("start_from", [])]}


def check_outputs(out, one_process):
    """Every stage finished from its base unchanged; adapters non-empty, trained (lora_B moved) and of the same
    tensors and shapes as the 1-process SFT run's (`sft_run`: the same LoRA on the same base; the reward
    model's adds its score head); SFT and PPO resumed from their checkpoints."""
    reference = {k: v.shape for k, v in load_file(str(one_process / "adapter_model.safetensors")).items()}
    for stage in TRAINED:
        m = metrics(out, stage)
        assert m["base_unchanged"], stage
        weights = load_file(str(out / stage / "adapter_model.safetensors"))
        assert all(t.numel() > 0 for t in weights.values()), f"{stage}: empty tensors (trl#4416)"
        assert sum(int(torch.count_nonzero(t) > 0) for k, t in weights.items() if "lora_B" in k) == 4 * 6, stage
        shapes = {k: v.shape for k, v in weights.items() if "lora_" in k}
        if stage == "reward":  # a sequence classifier: the same LoRA on its backbone, and its score head
            assert [tuple(v.shape) for k, v in weights.items() if "score" in k] == [(1, 128)]
            assert shapes == reference
        elif stage != "ppo":  # PPO's policy adapter is saved the same way (test_ppo.py checks its folder)
            assert shapes == reference, stage
    sft, ppo = metrics(out, "sft"), metrics(out, "ppo")
    assert sft["global_steps"] == 3 and sft["resumed_from"].endswith("sft-checkpoints/checkpoint-2")
    assert ppo["updates"] == 2 and ppo["resumed_from_update"] == 1 and ppo["processes"] == 2


def test_zero3_on_two_nodes_with_node_local_folders(zero3_node_local, sft_run, monkeypatch):
    root, (node0, node1), logs = zero3_node_local
    for out in (node0, node1):
        check_outputs(out, sft_run[2])
        for stage in TRAINED:  # each node wrote its own complete copy: the same bytes, the same figures
            assert (out / stage / "adapter_model.safetensors").read_bytes() == (
                node0 / stage / "adapter_model.safetensors"
            ).read_bytes(), stage
            assert node_independent(metrics(out, stage)) == node_independent(metrics(node0, stage))
    # ZeRO-3 partitioned the model: each node's checkpoint holds its own rank's model and optimiser states
    for rank, out in enumerate((node0, node1)):
        step = out / "sft-checkpoints/checkpoint-3"
        assert (step / "latest").read_text() == "global_step3"  # written on every node (DeepSpeed: rank 0 only)
        assert sorted(p.name for p in (step / "global_step3").iterdir()) == [
            f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        ]
        assert sorted(p.name for p in (out / "ppo-checkpoints/update-2").iterdir() if not p.name.startswith(".")) == [
            "engine.pt",
            f"rng_{rank}.pt",
            "state.json",
            "weights.safetensors",
        ]
    assert "output_dir is on each node's own disk" in logs[0]
    monkeypatch.chdir(root / "node1")  # the export runs on one node, from that node's copy
    from finetune import export

    m = export.run(load_recipe(TINY_RECIPE, ["output_dir=runs/two", *QUICK, "export.eval_generate_rows=0"]))
    assert m["stage"] == "ppo" and m["parity_max_abs_diff_fp32"] < 1e-4


def test_fsdp2_on_two_nodes_with_a_shared_folder(fsdp_shared, sft_run, monkeypatch):
    root, shared, logs = fsdp_shared
    check_outputs(shared, sft_run[2])
    assert not list(root.glob("node*/**/metrics.json"))  # every output went to the shared folder, once
    step = shared / "sft-checkpoints/checkpoint-3"  # FSDP sharded the model and optimiser: one DCP shard each
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (step / part).iterdir() if p.name != ".finetune") == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    assert sorted(p.name for p in (shared / "ppo-checkpoints/update-2").glob("rng_*")) == ["rng_0.pt", "rng_1.pt"]
    assert "own disk" not in logs[0]
    from finetune import export

    m = export.run(load_recipe(TINY_RECIPE, [f"output_dir={shared}", *QUICK, "export.eval_generate_rows=0"]))
    assert m["stage"] == "ppo" and m["parity_max_abs_diff_fp32"] < 1e-4
