"""Every stage reports to the trackers, read back with each tracker's own reader (no mocks): TensorBoard's
event-file reader and an MLflow file store on the session's pipeline (tiny recipe, killed during PPO and
continued), and W&B offline run files on a short SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.core import tracking
from finetune.recipe import RecipeError, load_recipe
from tests.conftest import TINY_RECIPE

pytestmark = pytest.mark.timeout(2400)  # the first test here may pay for the session's pipeline run

STAGES = ("sft", "reward", "dpo", "ppo", "export", "eval")
TRAINED = ("sft", "reward", "dpo")
PPO_CURVES = (
    "ppo/score",
    "ppo/kl",
    "ppo/eos_rate",
    "ppo/response_length",
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/clipfrac",
    "ppo/approxkl",
    "ppo/entropy",
    "ppo/beta",
    "train/learning_rate",
    "time/generate_s",
    "time/score_s",
    "time/optimise_s",
)


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file in `folder` (a stage run twice leaves two), tag -> {step: value}."""
    from tensorboard.backend.event_processing import event_accumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def wandb_records(path: Path) -> list:
    """The records of a W&B run file, decoded with wandb's own protobuf `Record`. The file is what
    `wandb sync` uploads: a 7-byte header (':W&B', 0xBEE1, version) then LevelDB's log format (32 KiB
    blocks of chunks with a 7-byte header: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4;
    leveldb doc/log_format.md). wandb <= 0.29 read it in Python (wandb/sdk/internal/datastore.py); from
    0.30 only its Go core does, so the few lines are here."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + chunk
            continue
        if kind not in (1, 4):  # zero padding at the end of the file
            break
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def metrics_json(pipeline_run, stage: str) -> dict:
    return json.loads((pipeline_run["out"] / stage / "metrics.json").read_text())


def test_tensorboard_has_every_stage_curves_in_one_folder_per_stage(pipeline_run):
    root = pipeline_run["out"] / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == sorted(STAGES)
    for stage in TRAINED:  # the Trainer's logs, named as transformers' own TensorBoard callback names them
        got = scalars(root / stage)
        assert len(got["train/loss"]) >= 2 and "train/learning_rate" in got and "train/grad_norm" in got, stage
    ppo = scalars(root / "ppo")
    for tag in PPO_CURVES:  # one point per update: updates 1-4 before the kill, 5-12 after the resume
        assert sorted(ppo[tag]) == list(range(1, 13)), tag
    updates = [json.loads(x) for x in (pipeline_run["out"] / "ppo" / "updates.jsonl").read_text().splitlines()]
    assert [round(ppo["ppo/score"][u["update"]], 5) for u in updates[4:]] == [round(u["score"], 5) for u in updates[4:]]
    for stage in STAGES:  # the held-out figures at the end: the stage's metrics.json
        figures = metrics_json(pipeline_run, stage)
        final = {k.removeprefix("final/"): v for k, v in scalars(root / stage).items() if k.startswith("final/")}
        key = {"sft": "correct_rate_after", "reward": "eval_accuracy", "dpo": "eval_rewards_accuracy"}.get(
            stage, {"ppo": "score_end", "export": "parity_max_abs_diff_fp32", "eval": "score"}.get(stage)
        )
        assert list(final[key].values())[0] == pytest.approx(figures[key], rel=1e-6), stage


def test_tensorboard_run_carries_the_recipe(pipeline_run):
    from tensorboard.backend.event_processing import event_accumulator

    folder = pipeline_run["out"] / "tensorboard" / "sft"
    acc = event_accumulator.EventAccumulator(str(next(folder.glob("events.out.tfevents.*"))))
    acc.Reload()
    assert "recipe/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name_or_path: builtin:tiny-phi" in text and "num_train_epochs: 8" in text


def test_mlflow_store_has_one_child_run_per_stage_under_the_pipeline_run(pipeline_run, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 opens a file store only when asked
    client = MlflowClient(pipeline_run["mlflow_uri"])
    experiment = client.get_experiment_by_name("finetune")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("finetune.stage") == "pipeline"]
    assert len(parents) >= 2  # the killed pipeline's and the one that finished (and any later rerun)
    by_stage: dict[str, list] = {}
    for run in runs:
        stage = run.data.tags.get("finetune.stage")
        if stage != "pipeline":
            assert run.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}, stage
            by_stage.setdefault(stage, []).append(run)
    assert set(by_stage) == set(STAGES)
    finished = {s: [r for r in rs if r.info.status == "FINISHED"] for s, rs in by_stage.items()}
    for stage in STAGES:
        assert len(finished[stage]) == 1, stage
        run = finished[stage][0]
        assert run.info.run_name == stage
        assert run.data.params["model.name_or_path"] == "builtin:tiny-phi" and run.data.params["lora.r"] == "16"
        assert run.data.params["ppo.updates"] == "12"  # the resolved recipe, overrides included
    for stage in TRAINED:
        history = client.get_metric_history(finished[stage][0].info.run_id, "train/loss")
        assert len(history) >= 2 and all(m.step > 0 for m in history), stage
    ppo = finished["ppo"][0]
    resumed = metrics_json(pipeline_run, "ppo")["resumed_from_update"]
    for key in PPO_CURVES:  # the continued run logs the updates it ran
        steps = [m.step for m in client.get_metric_history(ppo.info.run_id, key)]
        assert sorted(steps) == list(range(resumed + 1, 13)), key
    killed = [r for r in by_stage["ppo"] if r.info.status != "FINISHED"]
    assert killed and client.get_metric_history(killed[0].info.run_id, "ppo/score")  # its curve survived the kill
    # SIGKILL left the PPO run and the first pipeline run open; the rerun closed them as KILLED
    assert [r.info.status for r in killed] == ["KILLED"]
    statuses = [p.info.status for p in parents]  # the killed one, the one that finished, any later rerun
    assert statuses.count("KILLED") == 1 and "RUNNING" not in statuses
    assert not list(pipeline_run["out"].glob(".*.mlflow"))  # no run left open
    export = finished["export"][0].data.metrics["final/correct_rate_after"]
    assert export == pytest.approx(metrics_json(pipeline_run, "export")["correct_rate_after"])
    parent = client.get_run(finished["export"][0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"


def test_sft_reports_to_wandb_offline_with_the_same_names(tmp_path, tiny_base, monkeypatch):
    """A short SFT through its main (as `finetune sft` runs it) with W&B in offline mode and TensorBoard:
    the W&B run files hold the same curves under the same names, the recipe as config, and the summary."""
    from finetune import sft

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("FINETUNE_TRACKING_GROUP", "tiny-group")
    out = tmp_path / "run"
    args = [
        str(TINY_RECIPE),
        f"output_dir={out}",
        "sft.max_steps=3",
        "sft.eval_generate_rows=1",
        "sft.max_new_tokens=2",
        "logging.logging_steps=1",
        "logging.report_to=[wandb,tensorboard]",
    ]
    assert sft.main(args) == 0
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, summary, run = {}, {}, None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":  # one row per logged step (wandb writes a key as nested_key, or key)
            history[record.history.step.num] = {_key(i): json.loads(i.value_json) for i in record.history.item}
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    assert run.run_group == "tiny-group" and run.job_type == "sft" and run.display_name == "run-sft"
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["lora"]["r"] == 16 and config["sft"]["max_steps"] == 3
    assert sorted(s for s, row in history.items() if "train/loss" in row) == [1, 2, 3]
    tensorboard = scalars(out / "tensorboard" / "sft")
    assert {s: round(v, 5) for s, v in tensorboard["train/loss"].items()} == {
        s: round(row["train/loss"], 5) for s, row in history.items() if "train/loss" in row
    }
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    assert summary["final/eval_loss_after"] == pytest.approx(metrics["eval_loss_after"])
    assert summary["final/global_steps"] == 3


def test_names_follow_one_scheme():
    assert tracking.trainer_names({"loss": 1.0, "eval_loss": 2.0, "rewards/chosen": 3.0}) == {
        "train/loss": 1.0,
        "eval/loss": 2.0,
        "train/rewards/chosen": 3.0,
    }
    assert tracking.rl_names({"update": 3, "score": 1.0, "lr": 1e-4, "time_generate_s": 0.5}) == {
        "ppo/score": 1.0,
        "train/learning_rate": 1e-4,
        "time/generate_s": 0.5,
    }
    assert tracking.rl_names({"update": 1, "reward": 0.5}, "grpo") == {"grpo/reward": 0.5}


def test_tracker_choice_and_its_errors(monkeypatch):
    recipe = load_recipe(TINY_RECIPE, ["logging.report_to=[tensorboard, comet_ml]"])
    assert tracking.for_transformers(recipe) == ["comet_ml"]  # ours are not written twice by transformers
    assert tracking.for_transformers(load_recipe(TINY_RECIPE)) == "none"
    monkeypatch.setenv("AZUREML_RUN_ID", "job-1")
    assert tracking.requested(load_recipe(TINY_RECIPE)) == ["mlflow"]  # on Azure ML the job's run page gets it
    assert tracking.requested(load_recipe(TINY_RECIPE, ["logging.report_to=[none]"])) == []
    with pytest.raises(RecipeError, match="'all' would report everything twice"):
        load_recipe(TINY_RECIPE, ["logging.report_to=[all]"])


def test_only_a_run_left_running_is_closed_as_killed(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.create_experiment("x")
    open_run, done = (client.create_run(experiment).info.run_id for _ in range(2))
    client.set_terminated(done, "FINISHED")
    for run_id, status in ((open_run, "KILLED"), (done, "FINISHED")):
        marker = tmp_path / f".{run_id}.mlflow"
        tracking.remember_open_run(marker, run_id)
        assert tracking.close_orphaned_run(client, marker) == (run_id if status == "KILLED" else None)
        assert client.get_run(run_id).info.status == status
    assert tracking.close_orphaned_run(client, tmp_path / "absent.mlflow") is None


def test_mlflow_that_cannot_start_stops_the_stage_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    recipe = load_recipe(TINY_RECIPE, [f"output_dir={tmp_path}", "logging.report_to=[mlflow]"])
    with pytest.raises(RecipeError, match="mlflow could not start a run .*MLFLOW_ALLOW_FILE_STORE=true"):
        tracking.start(recipe, "sft")
