"""Experiment trackers for every stage: TensorBoard, MLflow and Weights & Biases, one naming scheme.

Every stage's `main` (finetune.launch.stage_main) opens one tracker run for the stage on the main
process: the resolved recipe as the run's parameters, the curves while it trains, and at the end the
numeric figures of the stage's metrics.json as `final/<key>`. The TRL stages feed it from a trainer
callback (`TrackerCallback`), PPO and GRPO from their update loop, export and eval only the final figures.

Names (the same in every tracker and stage):
  train/<key>, eval/<key>, test/<key>  what a transformers Trainer logs (`loss` -> `train/loss`,
                                       `eval_loss` -> `eval/loss`): the names transformers' own
                                       TensorBoard and W&B callbacks write (integration_utils.rewrite_logs);
                                       its MLflow callback writes the bare keys, here they are the same
  ppo/<key>                            PPO per update: score, kl, eos_rate, response_length,
                                       policy_loss, value_loss, clipfrac, approxkl, entropy, beta, ...
  grpo/<key>                           GRPO per update: reward, reward_std, frac_reward_zero_std, kl,
                                       clip_ratio_low/high, eos_rate, response_length, policy_loss, ...
  train/learning_rate                  PPO's and GRPO's policy learning rate too
  time/<part>_s                        PPO's and GRPO's time split per update: generate, score, optimise
  final/<key>                          the stage's metrics.json, once, at the last step

Why our own writers rather than transformers' callbacks for these three: the stages must group under
one pipeline run (MLflow parent and child runs, a W&B group, a TensorBoard folder per stage), PPO and
export have no Trainer, and transformers' MLflow callback writes other names than its TensorBoard and
W&B callbacks. Other `logging.report_to` entries (comet_ml, trackio, ...) still go to transformers.

Grouping: `finetune pipeline` opens an MLflow parent run and names a group; it hands both to the stage
processes in the environment (FINETUNE_MLFLOW_PARENT_RUN_ID, FINETUNE_TRACKING_GROUP). Each stage is
an MLflow child run, a W&B run in that group, and TensorBoard's `<tensorboard_dir>/<stage>/`.
Inside an Azure ML job (MLFLOW_RUN_ID set by the service) the stage logs into the job's own run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path

from finetune.recipe import Recipe, RecipeError, dump_recipe

from . import distributed
from .outputs import read_metrics

log = logging.getLogger(__name__)

OURS = ("tensorboard", "mlflow", "wandb")
ENV_PARENT = "FINETUNE_MLFLOW_PARENT_RUN_ID"
ENV_GROUP = "FINETUNE_TRACKING_GROUP"
INSTALL = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)", "wandb": "wandb"}
MODULE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


# ----------------------------------------------------------------------------- which trackers


def on_azureml() -> bool:
    """True inside an Azure ML job (it sets AZUREML_RUN_ID and an azureml:// MLflow tracking URI)."""
    return "AZUREML_RUN_ID" in os.environ or os.environ.get("MLFLOW_TRACKING_URI", "").startswith("azureml:")


def installed(name: str) -> bool:
    return importlib.util.find_spec(MODULE.get(name, name)) is not None


def requested(recipe: Recipe) -> list[str]:
    """logging.report_to, plus mlflow inside an Azure ML job so the metrics reach the job's run page.
    `report_to: [none]` turns every tracker off (on Azure ML too)."""
    report = list(recipe.logging.report_to)
    if "none" in report:
        return []
    if on_azureml() and "mlflow" not in report:
        if installed("mlflow"):
            report.append("mlflow")
        else:
            log.warning(
                "running on Azure ML without mlflow installed: metrics stay in the job log; use the "
                "environment built from azureml/Dockerfile, or add mlflow and azureml-mlflow to yours"
            )
    return report


def ours(recipe: Recipe) -> list[str]:
    """The trackers finetune writes itself (tensorboard, mlflow, wandb), checked installed."""
    names = [n for n in requested(recipe) if n in OURS]
    missing = [n for n in names if not installed(n)]
    if missing:
        raise RecipeError(
            f"{recipe.source}: logging.report_to: {', '.join(missing)} is not installed; pip install "
            + " ".join(INSTALL[n] for n in missing)
            + " (or `pip install 'finetune[trackers]'`), or remove it from logging.report_to"
        )
    return names


def for_transformers(recipe: Recipe) -> list[str] | str:
    """The report_to a TRL config gets: the trackers finetune does not write itself (finetune's
    callback writes tensorboard / mlflow / wandb, so transformers must not write them twice)."""
    rest = [n for n in requested(recipe) if n not in OURS]
    return rest or "none"


# ----------------------------------------------------------------------------- names


def trainer_names(logs: dict) -> dict:
    """A Trainer's log dict in the scheme: eval_x -> eval/x, test_x -> test/x, else train/x."""
    out = {}
    for key, value in logs.items():
        for prefix in ("eval", "test"):
            if key.startswith(prefix + "_"):
                out[f"{prefix}/{key[len(prefix) + 1 :]}"] = value
                break
        else:
            out[f"train/{key}"] = value
    return out


def rl_names(stats: dict, stage: str = "ppo") -> dict:
    """One RL update's figures (the engines' `step`: finetune.rl.ppo_engine, finetune.rl.grpo_engine) in the
    scheme, under the stage's name (ppo/score, grpo/reward, ...)."""
    out = {}
    for key, value in stats.items():
        if key == "update":
            continue
        if key == "lr":
            out["train/learning_rate"] = value
        elif key.startswith("time_"):
            out[f"time/{key[len('time_') :]}"] = value
        else:
            out[f"{stage}/{key}"] = value
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numbers of a dict (booleans as 0/1); strings, lists and None are left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def flat_params(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as flat run parameters: `lora.r`, `sft.learning_rate`, ... (lists as JSON)."""
    out = {}

    def walk(prefix: str, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", recipe.model_dump(mode="json", exclude_none=False))
    return out


def run_name(recipe: Recipe) -> str:
    return recipe.logging.run_name or Path(recipe.output_dir).name or "finetune"


def group_name(recipe: Recipe) -> str:
    """The pipeline's group (set by `finetune pipeline`), else the run name: a stage run alone still
    groups with the other stages of the same output_dir."""
    return os.environ.get(ENV_GROUP) or run_name(recipe)


def tensorboard_root(recipe: Recipe) -> Path:
    folder = recipe.logging.tensorboard_dir
    return recipe.output_path(folder) if folder else recipe.output_path(recipe.output_dir) / "tensorboard"


def experiment_name(recipe: Recipe) -> str:
    return recipe.logging.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "finetune"


# ----------------------------------------------------------------------------- writers


class _TensorBoard:
    def __init__(self, recipe: Recipe, stage: str, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = tensorboard_root(recipe) / stage
        self.writer = SummaryWriter(log_dir=str(self.folder))
        self.params = params
        # the recipe as text (the TEXT tab); the flat parameters go to the HPARAMS tab at the end
        self.writer.add_text("recipe", "\n".join("    " + line for line in dump_recipe(recipe).splitlines()), 0)

    def log(self, metrics: dict, step: int):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, final: dict, step: int, failed: bool):
        from torch.utils.tensorboard.summary import hparams

        for key, value in final.items():
            self.writer.add_scalar(key, value, step)
        # into this run's own file (SummaryWriter.add_hparams would open a sub-run per call)
        for summary in hparams(self.params, final):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


class _MLflow:
    """MlflowClient on MLFLOW_TRACKING_URI (a server, file:, azureml:, databricks ...). A child of the
    pipeline's parent run, or the Azure ML job's own run (MLFLOW_RUN_ID), else a run of its own."""

    MAX_PARAM = 6000  # MLflow's limit on a parameter value (mlflow/utils/validation.py)

    def __init__(self, recipe: Recipe, stage: str, params: dict):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.owned = "MLFLOW_RUN_ID" not in os.environ
        if self.owned:
            self.marker = open_run_marker(recipe, stage)
            close_orphaned_run(self.client, self.marker)
            tags = {"finetune.stage": stage, "finetune.group": group_name(recipe)}
            if os.environ.get(ENV_PARENT):
                tags["mlflow.parentRunId"] = os.environ[ENV_PARENT]
            experiment = experiment_id(self.client, experiment_name(recipe))
            run = self.client.create_run(experiment, run_name=stage_run_name(recipe, stage), tags=tags)
            self.run_id = run.info.run_id
            remember_open_run(self.marker, self.run_id)
        else:
            self.run_id = os.environ["MLFLOW_RUN_ID"]
        self._log_params(params)
        self.client.log_text(self.run_id, dump_recipe(recipe), f"{stage}/recipe.yaml")

    def _log_params(self, params: dict):
        from mlflow.entities import Param

        long = sorted(k for k, v in params.items() if len(v) > self.MAX_PARAM)
        if long:  # the whole recipe is the recipe.yaml artifact; say which keys only it holds
            log.warning("mlflow: %d recipe keys too long for a parameter, only in recipe.yaml: %s", len(long), long)
        items = [Param(k, v) for k, v in params.items() if k not in long]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, metrics: dict, step: int):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def finish(self, final: dict, step: int, failed: bool):
        self.log(final, step)
        if self.owned:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
            self.marker.unlink(missing_ok=True)


def open_run_marker(recipe: Recipe, name: str) -> Path:
    """Where a stage (or the pipeline) keeps the id of the MLflow run it has open: `<output_dir>/.<name>.mlflow`."""
    return recipe.output_path(recipe.output_dir) / f".{name}.mlflow"


def close_orphaned_run(client, marker: Path) -> str | None:
    """The run recorded in `marker` by an earlier process, if MLflow still shows it RUNNING, is marked KILLED:
    that process ended without closing it (SIGKILL, out of memory, power loss). The caller holds the output's
    lock, so no live process owns that run. Returns the id of a run so closed."""
    try:
        run_id = marker.read_text().strip()
    except OSError:
        return None
    try:
        if not run_id or client.get_run(run_id).info.status != "RUNNING":
            return None
        client.set_terminated(run_id, "KILLED")
    except Exception as e:  # another tracking server, a deleted run: nothing of ours to close
        log.debug("mlflow: left the earlier run %s as it is (%s)", run_id, e)
        return None
    log.info("mlflow: the earlier run %s ended without closing (killed?): marked KILLED", run_id)
    return run_id


def remember_open_run(marker: Path, run_id: str) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, marker)


def _mlflow_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and space; anything else (a TRL key with brackets) becomes _
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another stage process
        return client.get_experiment_by_name(name).experiment_id


def stage_run_name(recipe: Recipe, stage: str) -> str:
    return stage if os.environ.get(ENV_PARENT) else f"{run_name(recipe)}-{stage}"


class _Wandb:
    def __init__(self, recipe: Recipe, stage: str, params: dict):
        import wandb

        self.run = wandb.init(
            project=recipe.logging.project or os.environ.get("WANDB_PROJECT") or "finetune",
            group=group_name(recipe),
            job_type=stage,
            name=f"{run_name(recipe)}-{stage}",
            config=recipe.model_dump(mode="json"),
            dir=os.environ.get("WANDB_DIR") or str(recipe.output_path(recipe.output_dir)),
            reinit="create_new",
        )

    def log(self, metrics: dict, step: int):
        self.run.log(metrics, step=step)

    def finish(self, final: dict, step: int, failed: bool):
        self.run.summary.update(final)
        self.run.finish(exit_code=1 if failed else 0)


WRITERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


class Tracker:
    """The stage's open tracker runs; a Tracker with none does nothing (other processes, no trackers)."""

    def __init__(self, writers: dict | None = None):
        self.writers = writers or {}
        self.step = 0
        self._warned: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.writers)

    def _each(self, what: str, call):
        for name, writer in list(self.writers.items()):
            try:
                call(writer)
            except Exception as e:  # a tracker going away must not end a training run: say so once
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s: %s failed (%s: %s); training goes on", name, what, type(e).__name__, e)

    def log(self, metrics: dict, step: int) -> None:
        values = numeric(metrics)
        if not self.writers or not values:
            return
        self.step = max(self.step, step)
        self._each("logging", lambda w: w.log(values, step))

    def finish(self, metrics: dict, failed: bool = False) -> None:
        final = {f"final/{k}": v for k, v in numeric(metrics).items()}
        self._each("closing the run", lambda w: w.finish(final, self.step, failed))
        self.writers = {}


def trainer_callback(tracker: Tracker):
    """A transformers TrainerCallback feeding a Trainer's logs (loss, learning rate, grad norm, TRL's
    rewards/... and logps/...) to `tracker` at the trainer's global step, on the main process.
    (transformers is imported here, not with this module: `finetune config` should not pay for it.)"""
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                tracker.log(trainer_names(logs), state.global_step)

    return TrackerCallback()


_current = Tracker()


def current() -> Tracker:
    """The tracker of the stage running in this process (one that does nothing when none is open)."""
    return _current


def start(recipe: Recipe, stage: str) -> Tracker:
    """Open the stage's runs in every requested tracker (main process only). A tracker that cannot
    start (no server, no login) stops the stage here, before any model loads."""
    names = ours(recipe)
    if not names or not distributed.is_main():
        return Tracker()
    params = flat_params(recipe)
    writers = {}
    for name in names:
        try:
            writers[name] = WRITERS[name](recipe, stage, params)
        except Exception as e:
            for writer in writers.values():
                with contextlib.suppress(Exception):
                    writer.finish({}, 0, failed=True)
            raise RecipeError(
                f"{recipe.source}: logging.report_to: {name} could not start a run ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}). {_fix(name)}"
            ) from None
    log.info("tracking %s with %s", stage, ", ".join(_where(n, w, recipe) for n, w in writers.items()))
    return Tracker(writers)


def _fix(name: str) -> str:
    return {
        "mlflow": "Set MLFLOW_TRACKING_URI to your tracking server (http://...), or to a local folder as "
        "file:./mlruns together with MLFLOW_ALLOW_FILE_STORE=true (mlflow-skinny has no SQLite store), "
        "or remove mlflow from logging.report_to.",
        "wandb": "Log in with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to write the run "
        "locally and `wandb sync` it later, or remove wandb from logging.report_to.",
        "tensorboard": "Check that logging.tensorboard_dir is writable.",
    }[name]


def _where(name: str, writer, recipe: Recipe) -> str:
    if name == "tensorboard":
        return f"tensorboard ({writer.folder})"
    if name == "mlflow":
        return f"mlflow (run {writer.run_id})"
    return f"wandb ({writer.run.name}, group {group_name(recipe)})"


@contextlib.contextmanager
def stage_run(recipe: Recipe, stage: str):
    """Open the stage's tracker runs, make them `current()`, and close them at the end with the figures
    of the stage's metrics.json (the run is marked failed when the stage raised)."""
    global _current
    tracker = start(recipe, stage)
    _current = tracker
    try:
        yield tracker
    except BaseException:
        tracker.finish({}, failed=True)
        raise
    else:
        tracker.finish(read_metrics(recipe.stage_dir(stage)))
    finally:
        _current = Tracker()


# ----------------------------------------------------------------------------- the pipeline's run


class PipelineRun:
    """What `finetune pipeline` opens around its stages: the environment that groups them (a group
    name for W&B and run tags; an MLflow parent run when mlflow is tracked), closed at the end."""

    def __init__(self, recipe: Recipe):
        self.env: dict[str, str] = {}
        self.client = self.run_id = None
        names = ours(recipe)
        if not names:
            return
        self.env[ENV_GROUP] = f"{run_name(recipe)}-{time.strftime('%Y%m%d-%H%M%S')}"
        if "mlflow" in names and "MLFLOW_RUN_ID" not in os.environ:
            from mlflow import MlflowClient

            try:
                self.client = MlflowClient()
                self.marker = open_run_marker(recipe, "pipeline")
                close_orphaned_run(self.client, self.marker)
                experiment = experiment_id(self.client, experiment_name(recipe))
                self.run_id = self.client.create_run(
                    experiment,
                    run_name=run_name(recipe),
                    tags={"finetune.group": self.env[ENV_GROUP], "finetune.stage": "pipeline"},
                ).info.run_id
                remember_open_run(self.marker, self.run_id)
            except Exception as e:
                raise RecipeError(
                    f"{recipe.source}: logging.report_to: mlflow could not start the pipeline's run "
                    f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}). "
                    f"{_fix('mlflow')}"
                ) from None
            self.client.log_text(self.run_id, dump_recipe(recipe), "recipe.yaml")
            self.env[ENV_PARENT] = self.run_id

    def finish(self, report_path: Path, failed: bool, curves: Path | None = None) -> None:
        if self.run_id is None:
            return
        with contextlib.suppress(Exception):  # the stages' runs are written; the summary is a convenience
            self.client.log_artifact(self.run_id, str(report_path))
            if curves is not None and curves.is_file():
                self.client.log_artifact(self.run_id, str(curves))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        self.marker.unlink(missing_ok=True)
