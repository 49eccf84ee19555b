"""Run a stage, or the whole pipeline, on an Azure ML cluster (azure-ai-ml SDK v2).

    finetune azureml submit RECIPE --stage sft|reward|dpo|ppo|export|pipeline [--dry-run] [--stream]
                            [--compute NAME] [--instance-count N] [--gpus-per-node N] ... [key=value ...]

A stage becomes a command job that runs the command a local user runs (`launch.stage_command`:
`python finetune/<stage>.py RECIPE overrides`) in a snapshot of this repository, once per GPU: the
PyTorch distribution starts `gpus_per_node` processes on each of `instance_count` nodes with
RANK / LOCAL_RANK / WORLD_SIZE set, and the trainer reads the recipe's DeepSpeed config. (Azure ML
has no DeepSpeed distribution and does not take a launcher of our own: docs/azureml.md.)

How stages hand adapters to each other: every job keeps the recipe's `output_dir` as its working
folder and links each earlier stage's output (a job input) to `<output_dir>/<stage>`, exactly where
the local pipeline leaves it; its own `<output_dir>/<stage>` is copied to its job output (a datastore
path) at the end. So the recipe's default `start_from` / `reward_from` need no override, and the
adapter chains a stage records (paths of the adapters it was trained on, read again by PPO and export)
stay valid in every later job. Pointing those keys at the input mounts instead would record one job's
mount path, which does not exist in the next job.

`--dry-run` writes the job YAML and loads it with `azure.ai.ml.load_job` (the SDK's own schema check;
offline, no credentials). Submitting loads the same file and sends it with DefaultAzureCredential.
The SDK is imported only here, lazily: the rest of finetune works without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.core.data import local_source
from finetune.errors import UserError
from finetune.launch import INTERRUPTED, ignoring_sigint, stage_command, stage_script
from finetune.readers import read_json
from finetune.recipe import STAGES, Recipe, RecipeError, load_recipe
from finetune.recipe.stages import CHAIN_KEY

REPO_DIR = Path(__file__).resolve().parents[2]  # the checkout whose snapshot a job runs
COMMAND_SCHEMA = "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"
PIPELINE_SCHEMA = "https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json"
DOCKERFILE = "azureml/Dockerfile"

# Flags of `submit` -> azureml.<key> (they override the recipe's azureml section).
FLAGS = {
    "subscription": "subscription_id",
    "resource_group": "resource_group",
    "workspace": "workspace_name",
    "config": "config",
    "compute": "compute",
    "instance_count": "instance_count",
    "gpus_per_node": "gpus_per_node",
    "environment": "environment",
    "datastore": "datastore",
    "output_path": "output_path",
    "experiment": "experiment_name",
    "model_name": "model_name",
    "model_version": "model_version",
}


class AzureMLError(RuntimeError):
    """A problem with Azure (credentials, workspace, compute) the user must fix; the message says how."""


# ----------------------------------------------------------------------------- building jobs


def _repo_relative(path: str | Path, what: str, recipe: Recipe) -> str:
    """A path inside the repository, relative to its root: what the job's code snapshot holds."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(REPO_DIR).as_posix()
    except ValueError:
        raise RecipeError(
            f"{recipe.source}: {what}: {resolved} is outside the repository {REPO_DIR}; an Azure ML job gets a "
            "snapshot of the repository, so put the file inside it (e.g. under recipes/)"
        ) from None


def datastore_uri(recipe: Recipe, stage: str) -> str:
    a = recipe.azureml
    base = (a.output_path or f"finetune/{Path(recipe.output_dir).name}").strip("/")
    return f"azureml://datastores/{a.datastore}/paths/{base}/{stage}/"


def _upstream(recipe: Recipe, stage: str, key: str, default: str) -> str | None:
    """The earlier stage whose output `key` points at (None: it starts from no adapter)."""
    if recipe.section(stage) is None:
        return default
    folder = recipe.input_dir(stage, key)
    if folder is None:
        return None
    for earlier in STAGES.names():
        if folder.resolve() == recipe.stage_dir(earlier).resolve():  # ./runs/x/sft or its absolute path alike
            return earlier
    raise RecipeError(
        f"{recipe.source}: {stage}.{key}: {str(folder)!r} is not an earlier stage's output; on Azure ML a stage reads "
        f"earlier stages from the datastore ({datastore_uri(recipe, default)}), so leave {stage}.{key} unset, set it "
        f"to <output_dir>/<stage> (e.g. {recipe.stage_dir(default)}), or to none"
    )


def stage_upstreams(recipe: Recipe, stage: str, chain_only: bool = False) -> list[str]:
    """The earlier stages whose outputs this stage's job takes as inputs, in pipeline order. An input
    with no key (needed only as part of an adapter chain) is linked whenever the stage reads any keyed
    input, and for a stage with no keyed inputs (export) whenever the recipe's pipeline has that stage. An
    input's own adapter chain comes too (a start_from pointing at DPO's output needs the SFT adapter under it),
    but not what that input read only while it trained (PPO's reward model is not part of PPO's adapter chain).
    `chain_only`: only the stages under this stage's own adapter chain."""
    table = {e: k for e, k in STAGES.inputs(stage).items() if not chain_only or k in (None, CHAIN_KEY)}
    keyed = {_upstream(recipe, stage, key, earlier) for earlier, key in table.items() if key is not None}
    keyed.discard(None)
    has_keys = any(key is not None for key in STAGES.inputs(stage).values())
    in_pipeline = recipe.pipeline_stages()
    chain = {
        earlier
        for earlier, key in table.items()
        if key is None and (keyed or (not has_keys and earlier in in_pipeline))
    }
    found = keyed | chain
    for earlier in list(found):
        if recipe.section(earlier) is not None:
            found |= set(stage_upstreams(recipe, earlier, chain_only=True))
    return [s for s in STAGES.names() if s in found]


def _data_inputs(recipe: Recipe, stage: str, yaml_dir: Path) -> tuple[dict, list[str]]:
    """Local data files of a stage -> uri_file / uri_folder inputs and the overrides that point the
    stage's data lists at them. Hub dataset ids pass through unchanged."""
    section = recipe.section(stage)
    if not STAGES[stage].has_data or section is None:
        return {}, []
    inputs, overrides = {}, []
    for split in ("train", "eval"):
        sources, changed = [], False
        for i, source in enumerate(getattr(section.data, split)):
            try:
                local = local_source(source, recipe)
            except UserError as e:
                raise RecipeError(f"{recipe.source}: {stage}.data.{split}[{i}].path: {e}") from None
            entry = source.model_dump(mode="json")
            if local is not None:
                name = f"data_{split}_{i}"
                inputs[name] = {
                    "type": "uri_folder" if local.is_dir() else "uri_file",
                    "path": os.path.relpath(local, yaml_dir),
                }
                entry["path"] = f"${{{{inputs.{name}}}}}"
                changed = True
            sources.append(entry)
        if changed:
            overrides.append(f"{stage}.data.{split}={json.dumps(sources)}")
    return inputs, overrides


def _model_input(recipe: Recipe, yaml_dir: Path) -> tuple[dict, list[str]]:
    """A local base model folder becomes a uri_folder input; hub ids and builtin: pass through."""
    path = Path(recipe.model_path())
    if recipe.model.name_or_path.startswith("builtin:") or not path.is_dir():
        return {}, []
    return (
        {"model": {"type": "uri_folder", "path": os.path.relpath(path, yaml_dir)}},
        ["model.name_or_path=${{inputs.model}}"],
    )


def _environment(recipe: Recipe, yaml_dir: Path):
    env = recipe.azureml.environment
    if env is None:
        return {"build": {"path": os.path.relpath(REPO_DIR, yaml_dir), "dockerfile_path": DOCKERFILE}}
    name = env.removeprefix("azureml:")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+|@latest)", name):
        raise RecipeError(
            f"{recipe.source}: azureml.environment: {env!r}: name a registered environment as "
            "name:version or name@latest (e.g. phi-finetune@latest), or leave it unset to build "
            f"{DOCKERFILE}"
        )
    return f"azureml:{name}"


def _check_settings(recipe: Recipe) -> None:
    if not recipe.azureml.compute:
        raise RecipeError(
            f"{recipe.source}: azureml.compute: no compute cluster named; set azureml.compute in the "
            "recipe or pass --compute NAME (a GPU cluster of the workspace)"
        )
    for key in ("deepspeed",):
        if getattr(recipe, key):
            _repo_relative(recipe.resolve_path(getattr(recipe, key)), key, recipe)
    template = recipe.template.name
    if template.endswith(".jinja"):
        _repo_relative(recipe.resolve_path(template), "template.name", recipe)


@dataclass
class StageJob:
    """One stage as a command job: its YAML mapping and the pieces tests and pipelines look at."""

    stage: str
    spec: dict
    local_command: list[str]  # the stage's own command line, as a local user runs it
    upstreams: list[str]


def build_stage_job(
    recipe: Recipe, stage: str, overrides: list[str], yaml_dir: Path, upstream_binding=None
) -> StageJob:
    """The command job that runs `stage` of `recipe` (loaded with `overrides`, which the job repeats).

    `upstream_binding(earlier)` gives the input for an earlier stage's output: by default its
    datastore path (where an earlier job wrote it); a pipeline binds the earlier step's output."""
    if stage not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}; use one of {', '.join(STAGES.names())} or pipeline")
    if recipe.section(stage) is None:
        raise RecipeError(f"{recipe.source}: {stage}: section missing; this recipe has no {stage} stage")
    _check_settings(recipe)
    a = recipe.azureml
    recipe_rel = _repo_relative(recipe.source, "recipe", recipe)
    data_inputs, data_overrides = _data_inputs(recipe, stage, yaml_dir)
    model_inputs, model_overrides = _model_input(recipe, yaml_dir)
    upstreams = stage_upstreams(recipe, stage)
    bind = upstream_binding or (
        lambda earlier: {"type": "uri_folder", "path": datastore_uri(recipe, earlier), "mode": "ro_mount"}
    )
    inputs = {**{u: bind(u) for u in upstreams}, **data_inputs, **model_inputs}
    job_overrides = [o for o in overrides if not o.startswith("azureml.")] + data_overrides + model_overrides
    # The launcher is Azure ML's (one process per GPU): the stage runs in-process in each of them.
    try:
        script = stage_script(stage, REPO_DIR)
    except ValueError:
        raise RecipeError(
            f"{recipe.source}: the {stage} stage's module ({stage_script(stage)}) lies outside the repository "
            f"{REPO_DIR}; an Azure ML job runs a snapshot of the repository, so the module must be inside it"
        ) from None
    local = stage_command(stage, recipe_rel, job_overrides, python="python", script=script)
    out = shlex.quote(recipe.output_dir)
    links = [
        f"{{ ln -sfn ${{{{inputs.{u}}}}} {shlex.quote(str(recipe.stage_dir(u)))} || "
        f"test -L {shlex.quote(str(recipe.stage_dir(u)))}; }}"
        for u in upstreams
    ]
    copy_out = (
        f'{{ [ "${{RANK:-0}}" != 0 ] || cp -rL {shlex.quote(str(recipe.stage_dir(stage)))}/. '
        f"${{{{outputs.{stage}}}}}; }}"
    )
    command = " &&\n".join([f"mkdir -p {out}", *links, shlex.join(local), copy_out])
    # a stage that needs no launcher (export, eval) runs once: N copies would each merge and write the export
    launched = STAGES[stage].launcher
    spec = {
        "type": "command",
        "display_name": f"{Path(recipe.source).stem}-{stage}",
        "code": os.path.relpath(REPO_DIR, yaml_dir),
        "command": command,
        "environment": _environment(recipe, yaml_dir),
        # the snapshot's finetune package wins over the copy installed in the image
        "environment_variables": {"PYTHONPATH": "."},
        "compute": f"azureml:{a.compute}",
        "resources": {"instance_count": a.instance_count if launched else 1},
        "distribution": {"type": "pytorch", "process_count_per_instance": a.gpus_per_node if launched else 1},
        "inputs": inputs,
        "outputs": {stage: {"type": "uri_folder", "path": datastore_uri(recipe, stage), "mode": "rw_mount"}},
    }
    if not inputs:
        del spec["inputs"]
    return StageJob(stage, spec, local, upstreams)


def command_job_yaml(recipe: Recipe, stage: str, overrides: list[str], yaml_dir: Path) -> dict:
    job = build_stage_job(recipe, stage, overrides, yaml_dir)
    return {"$schema": COMMAND_SCHEMA, **job.spec, "experiment_name": recipe.azureml.experiment_name}


def pipeline_job_yaml(recipe: Recipe, overrides: list[str], yaml_dir: Path, stages: list[str] | None = None) -> dict:
    """A pipeline job: one command step per stage; each step's output feeds the later steps' inputs,
    and is also bound to the stage's datastore path (so single-stage jobs can pick up from it)."""
    stages = recipe.pipeline_stages() if stages is None else stages
    steps, outputs = {}, {}
    for stage in stages:

        def bind(earlier, stage=stage):
            if earlier in steps:
                return f"${{{{parent.jobs.{earlier}.outputs.{earlier}}}}}"
            return {"type": "uri_folder", "path": datastore_uri(recipe, earlier), "mode": "ro_mount"}

        job = build_stage_job(recipe, stage, overrides, yaml_dir, upstream_binding=bind)
        outputs[stage] = job.spec["outputs"][stage]
        steps[stage] = {**job.spec, "outputs": {stage: f"${{{{parent.outputs.{stage}}}}}"}}
    exported = STAGES.model_folder_stage()  # the stage whose output is the model folder to register
    if exported in steps and recipe.azureml.register_model:
        steps[REGISTER_STEP], outputs[REGISTER_STEP] = register_step(recipe, yaml_dir, steps[exported], exported)
    return {
        "$schema": PIPELINE_SCHEMA,
        "type": "pipeline",
        "display_name": f"{Path(recipe.source).stem}-pipeline",
        "experiment_name": recipe.azureml.experiment_name,
        "settings": {"default_compute": f"azureml:{recipe.azureml.compute}"},
        "outputs": outputs,
        "jobs": steps,
    }


# ----------------------------------------------------------------------------- the registered model

REGISTER_STEP = "register"
MODEL_SCHEMA = "https://azuremlschemas.azureedge.net/latest/model.schema.json"
# custom_model, not mlflow_model: the export is a plain Hugging Face folder (no MLmodel file); an mlflow_model
# would need mlflow's transformers flavour to wrap it and would be served by MLflow's generic scoring server,
# which knows neither the embedded chat template nor the end-of-turn stop. A custom_model deploys to a managed
# online endpoint with azureml/score.py, which serves it exactly as plain transformers loads it
# (docs/azureml.md, "Deploy the registered model").
MODEL_TYPE = "custom_model"


def model_name(recipe: Recipe) -> str:
    """azureml.model_name, else the run's name (the last part of output_dir: phi2_chat for the shipped
    recipes), in the characters Azure ML allows."""
    if recipe.azureml.model_name:
        return recipe.azureml.model_name
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", Path(recipe.output_dir).name).lstrip("-_.")
    return name or "finetune-model"


def model_description(recipe: Recipe) -> str:
    return (
        f"finetune export ({model_name(recipe)}): {recipe.model.name_or_path} with its LoRA stages merged; "
        f"chat template {recipe.template.name} embedded. README.md (the model card), metrics.json, recipe.yaml inside."
    )


def register_step(recipe: Recipe, yaml_dir: Path, export_step: dict, exported: str) -> tuple[dict, dict]:
    """The pipeline's last step: the export step's output copied to a custom_model output that carries
    a name (and version): Azure ML registers such an output as a model asset when the job completes.
    The folder is the whole export: weights, tokenizer with the chat template, model card, metrics."""
    output = {"type": MODEL_TYPE, "name": model_name(recipe)}  # the SDK takes no description on a job output
    if recipe.azureml.model_version:
        output["version"] = str(recipe.azureml.model_version)
    step = {
        "type": "command",
        "display_name": f"{Path(recipe.source).stem}-{REGISTER_STEP}",
        "command": f"cp -rL ${{{{inputs.{exported}}}}}/. ${{{{outputs.model}}}} && "
        "cat ${{outputs.model}}/metrics.json",
        "environment": export_step["environment"],
        "compute": export_step["compute"],
        "resources": {"instance_count": 1},
        "inputs": {exported: f"${{{{parent.jobs.{exported}.outputs.{exported}}}}}"},
        "outputs": {"model": f"${{{{parent.outputs.{REGISTER_STEP}}}}}"},
    }
    return step, output


def export_folder(target: str, overrides: list[str]) -> tuple[Path, Recipe]:
    """The finished export `target` names (an export folder or a recipe) and the recipe it was made with."""
    path = Path(target)
    if path.is_dir():
        if not (path / "metrics.json").is_file() or not (path / "config.json").is_file():
            raise RecipeError(f"{path}: not a finished export (no config.json / metrics.json); run finetune export")
        if not (path / "recipe.yaml").is_file():
            raise RecipeError(f"{path}: no recipe.yaml; register an export written by finetune export")
        return path, load_recipe(path / "recipe.yaml", overrides)
    recipe = load_recipe(target, overrides)
    folder = recipe.stage_dir(STAGES.model_folder_stage())
    if not (folder / "metrics.json").is_file():
        raise RecipeError(
            f"{recipe.source}: no finished export in {folder}; run `finetune export {recipe.source}` first"
        )
    return folder, recipe


def model_yaml(folder: Path, recipe: Recipe, out_dir: Path, name: str | None = None) -> Path:
    """Write `<out_dir>/<name>-model.yaml` (the model asset: path relative to the file, tags from the export's
    metrics.json) and validate it with azure.ai.ml.load_model (offline)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    name = name or model_name(recipe)
    tags = {
        "base_model": recipe.model.name_or_path,
        "stage": str(metrics.get("stage")),
        "template": recipe.template.name,
        "dtype": str(metrics.get("dtype")),
        "made_with": "finetune",
    }
    for key in ("correct_rate_after", "correct_rate_base", "parity_max_abs_diff_fp32"):
        if metrics.get(key) is not None:
            tags[key] = f"{metrics[key]:.4g}"
    spec = {
        "$schema": MODEL_SCHEMA,
        "name": name,
        "type": MODEL_TYPE,
        "path": os.path.relpath(folder.resolve(), out_dir.resolve()),
        "description": model_description(recipe),
        "tags": tags,
        "properties": {"adapters": " + ".join(Path(a).name for a in metrics.get("adapters", []))},
    }
    if recipe.azureml.model_version:
        spec["version"] = str(recipe.azureml.model_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-model.yaml"
    path.write_text(
        "# Written by `finetune azureml register`; the path is relative to this file. Register with\n"
        f"#   az ml model create --file {path.name}   (or finetune azureml register without --dry-run)\n"
        + yaml.dump(spec, Dumper=_Dumper, sort_keys=False, width=120)
    )
    load_model(path)
    return path


def load_model(path: Path):
    """The SDK's own model loader and schema check (offline)."""
    from azure.ai.ml import load_model as sdk_load_model

    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    try:
        return sdk_load_model(path)
    except Exception as e:
        raise AzureMLError(f"{path}: the Azure ML SDK refused this model YAML: {e}") from e


def load_job(path: Path):
    """The SDK's own loader and schema check (offline)."""
    from azure.ai.ml import load_job as sdk_load_job

    # the SDK logs a notice per "experimental" class it touches while loading; not ours to act on
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    try:
        return sdk_load_job(path)
    except Exception as e:  # marshmallow / SDK ValidationError: a bug in what we wrote, with the reason
        raise AzureMLError(f"{path}: the Azure ML SDK refused this job YAML: {e}") from e


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the command: one step a line) as YAML literal blocks."""


_Dumper.ignore_aliases = lambda self, data: True  # steps share their environment mapping: write it out each time
_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def write_job(recipe: Recipe, stage: str, overrides: list[str], out_dir: Path) -> Path:
    """Write `<out_dir>/<recipe>-<stage>.yaml` for a stage or the pipeline and validate it with load_job."""
    if stage != "pipeline" and stage not in STAGES:
        raise RecipeError(f"unknown stage {stage!r}; use one of {', '.join(STAGES.names())} or pipeline")
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_dir = out_dir.resolve()
    spec = (
        pipeline_job_yaml(recipe, overrides, yaml_dir)
        if stage == "pipeline"
        else command_job_yaml(recipe, stage, overrides, yaml_dir)
    )
    path = out_dir / f"{Path(recipe.source).stem}-{stage}.yaml"
    header = (
        f"# Written by `finetune azureml submit`; paths are relative to this file. Submit with\n"
        f"#   az ml job create --file {path.name}   (or finetune azureml submit without --dry-run)\n"
    )
    path.write_text(header + yaml.dump(spec, Dumper=_Dumper, sort_keys=False, width=120))
    load_job(path)
    return path


# ----------------------------------------------------------------------------- submitting


def workspace_ids(recipe: Recipe) -> tuple[str, str, str]:
    """(subscription, resource group, workspace) from the recipe/flags or a config.json."""
    a = recipe.azureml
    ids = (a.subscription_id, a.resource_group, a.workspace_name)
    if all(ids):
        return ids
    candidates = (
        [Path(recipe.resolve_path(a.config))] if a.config else [Path("config.json"), Path(".azureml/config.json")]
    )
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        given = f"{a.config} was not found. " if a.config else ""
        raise AzureMLError(
            f"No Azure ML workspace given. {given}Name it with azureml.subscription_id, azureml.resource_group and "
            "azureml.workspace_name in the recipe (or --subscription, --resource-group, --workspace), or download "
            "the workspace's config.json (Azure portal: the workspace's overview page, 'Download config.json') "
            "and pass --config PATH. --dry-run needs none of this."
        )
    try:
        data = read_json(found, RecipeError)
        return (
            a.subscription_id or data["subscription_id"],
            a.resource_group or data["resource_group"],
            a.workspace_name or data["workspace_name"],
        )
    except (RecipeError, KeyError, TypeError) as e:
        raise AzureMLError(
            f"{found}: not an Azure ML workspace config.json (needs subscription_id, resource_group "
            f"and workspace_name; problem: {e}); download it again from the Azure portal"
        ) from None


ARM_SCOPE = "https://management.azure.com/.default"


def ml_client(recipe: Recipe):
    """An MLClient for the recipe's workspace, after checking that a credential gives a token and the
    workspace is reachable; each failure a user can fix is an AzureMLError saying what to do."""
    subscription, group, workspace = workspace_ids(recipe)
    from azure.ai.ml import MLClient
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    try:  # ask for a token now: a missing login then reads as one, not as a failure deep in the upload
        credential.get_token(ARM_SCOPE)
    except ClientAuthenticationError:
        raise AzureMLError(
            "No Azure credentials found. Sign in with `az login` (and `az account set --subscription "
            f"{subscription}`), or set AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET for a service "
            "principal, or run where a managed identity is available; DefaultAzureCredential tries each of "
            "these. Then submit again (or use --dry-run to write and check the YAML offline)."
        ) from None
    client = MLClient(credential, subscription, group, workspace)
    try:
        client.workspaces.get(workspace)
    except (ResourceNotFoundError, HttpResponseError) as e:
        raise AzureMLError(
            f"Workspace {workspace!r} in resource group {group!r} of subscription {subscription} was not found or "
            f"is not accessible ({_reason(e)}). Check the three ids (or download the workspace's config.json from "
            "the Azure portal and pass --config), and that your account has a role on the workspace."
        ) from None
    return client


@dataclass
class Sent:
    """How far a submit or register got, for the message after a Ctrl-C: whether anything may have reached
    Azure ML, and the job it created."""

    what: str = "job"
    sending: bool = False  # the upload and create request are under way: it may or may not exist
    job: str | None = None  # created (its name)
    studio: str | None = None


def interrupted(sent: Sent, recipe: Recipe | None) -> str:
    """The one paragraph after a Ctrl-C in `finetune azureml`: what exists on Azure ML now and what to do."""
    where = ""
    if recipe is not None and recipe.azureml.resource_group and recipe.azureml.workspace_name:
        where = f" --resource-group {recipe.azureml.resource_group} --workspace-name {recipe.azureml.workspace_name}"
    if sent.job:
        return (
            f"finetune azureml: interrupted (Ctrl-C) while following job {sent.job}; the job keeps running on Azure ML "
            f"({sent.studio}). Follow it again with `az ml job stream --name {sent.job}{where}`, or stop it with "
            f"`az ml job cancel --name {sent.job}{where}`"
        )
    if sent.sending:
        listing = "az ml job list" if sent.what == "job" else "az ml model list"
        return (
            f"finetune azureml: interrupted (Ctrl-C) while the {sent.what} was being sent: it may or may not have been "
            f"created. Look with `{listing}{where}` (or in Azure ML studio) before you send it again, so that it does "
            "not run twice"
        )
    return f"finetune azureml: interrupted (Ctrl-C) before anything was sent; no {sent.what} was created"


def submit(recipe: Recipe, job_path: Path, stream: bool, sent: Sent | None = None) -> str:
    """Submit a validated job YAML; returns the job name. Every Azure failure a user can fix becomes an
    AzureMLError saying what to do (never a token or key: none is printed or written). `sent` records how far
    it got (for a Ctrl-C)."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    sent = sent or Sent()
    client = ml_client(recipe)
    workspace = workspace_ids(recipe)[2]
    compute = recipe.azureml.compute
    try:
        client.compute.get(compute)
    except (ResourceNotFoundError, HttpResponseError) as e:
        raise AzureMLError(
            f"Compute {compute!r} was not found in workspace {workspace!r} ({_reason(e)}). Create a GPU cluster "
            "(Azure ML studio: Compute > Compute clusters, or `az ml compute create --type AmlCompute --name "
            f"{compute} --size Standard_NC24ads_A100_v4 --max-instances 2`) or name an existing one with "
            "--compute / azureml.compute."
        ) from None
    try:
        job_spec = load_job(job_path)
        sent.sending = True
        job = client.jobs.create_or_update(job_spec)
    except HttpResponseError as e:
        raise AzureMLError(
            f"Azure ML refused the job ({_reason(e)}). The job YAML is {job_path}; fix the named "
            "setting and submit again."
        ) from None
    sent.job, sent.studio = job.name, job.studio_url
    print(f"submitted {job.name}\n  studio: {job.studio_url}", flush=True)
    if stream:
        client.jobs.stream(job.name)
    return job.name


def register(recipe: Recipe, model_path: Path, sent: Sent | None = None) -> str:
    """Register a validated model YAML (uploads the export folder); returns name:version."""
    from azure.core.exceptions import HttpResponseError

    sent = sent or Sent("model")
    client = ml_client(recipe)
    try:
        spec = load_model(model_path)
        sent.sending = True
        model = client.models.create_or_update(spec)
    except HttpResponseError as e:
        raise AzureMLError(
            f"Azure ML refused the model ({_reason(e)}). The model YAML is {model_path}; fix the named setting "
            "(azureml.model_name / azureml.model_version) and register again."
        ) from None
    print(f"registered model {model.name}:{model.version}", flush=True)
    return f"{model.name}:{model.version}"


def _reason(error) -> str:
    """The service's one-line reason (the message's first line; no headers, no tokens)."""
    message = getattr(error, "message", None) or str(error)
    return message.strip().splitlines()[0][:300] if message.strip() else type(error).__name__


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune azureml submit",
        description="Run a stage of a recipe, or the whole pipeline, as an Azure ML job. Flags override the "
        "recipe's azureml section.",
    )
    p.add_argument("recipe", help="recipe YAML inside this repository, e.g. recipes/phi2_chat.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, passed to the stage too (sft.max_steps=20)")
    p.add_argument("--stage", required=True, choices=[*STAGES.names(), "pipeline"])
    p.add_argument("--dry-run", action="store_true", help="write and validate the job YAML offline; submit nothing")
    p.add_argument("--stream", action="store_true", help="follow the job's logs after submitting")
    p.add_argument("--out", default="azureml-jobs", help="folder for the job YAML (default: azureml-jobs)")
    for flag, key in FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=f"azureml.{key}")
    return p


def register_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune azureml register",
        description="Register an export (a finished `finetune export` folder, or a recipe's export) as an Azure ML "
        "model asset (custom_model): the folder with its model card, chat template and metrics.",
    )
    p.add_argument("target", help="export folder, or the recipe whose export to register")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the recipe (azureml.model_version=3)")
    p.add_argument("--dry-run", action="store_true", help="write and validate the model YAML offline; upload nothing")
    p.add_argument("--out", default="azureml-jobs", help="folder for the model YAML (default: azureml-jobs)")
    for flag, key in FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=f"azureml.{key}")
    return p


USAGE = (
    "usage: finetune azureml submit RECIPE --stage STAGE [--dry-run] [--stream] [flags] [key=value ...]\n"
    "       finetune azureml register EXPORT_DIR_OR_RECIPE [--dry-run] [--model-name N] [--model-version V]\n"
    "       finetune azureml submit --help | finetune azureml register --help"
)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("submit", "register"):
        print(USAGE, file=sys.stderr)
        return 2
    command = argv[0]
    args = (parser() if command == "submit" else register_parser()).parse_intermixed_args(argv[1:])
    flags = [f"azureml.{key}={getattr(args, flag)}" for flag, key in FLAGS.items() if getattr(args, flag) is not None]
    sent, recipe = Sent("job" if command == "submit" else "model"), None
    try:
        if command == "register":
            folder, recipe = export_folder(args.target, [*args.overrides, *flags])
            path = model_yaml(folder, recipe, Path(args.out))
            print(f"wrote {path} (validated with azure.ai.ml.load_model)", flush=True)
            if args.dry_run:
                print(f"  register it: az ml model create --file {path}  (or this command without --dry-run)")
                return 0
            register(recipe, path, sent)
            return 0
        recipe = load_recipe(args.recipe, [*args.overrides, *flags])
        path = write_job(recipe, args.stage, args.overrides, Path(args.out))
        print(f"wrote {path} (validated with azure.ai.ml.load_job)", flush=True)
        if args.dry_run:
            print(f"  submit it: az ml job create --file {path}  (or this command without --dry-run)")
            return 0
        submit(recipe, path, args.stream, sent)
    except KeyboardInterrupt:
        with ignoring_sigint():  # a second Ctrl-C must not turn this into a traceback
            print(interrupted(sent, recipe), file=sys.stderr)
        return INTERRUPTED
    except UserError as e:
        print(f"finetune azureml: error:\n{e}", file=sys.stderr)
        return 2
    except AzureMLError as e:
        print(f"finetune azureml: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(
            f"finetune azureml: the Azure ML SDK is not installed ({e.name}); pip install 'finetune[azureml]'",
            file=sys.stderr,
        )
        return 2
    return 0
