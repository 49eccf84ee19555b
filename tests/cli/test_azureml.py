"""Azure ML submission, offline: the job YAML the SDK's own loader accepts, the job's command run
locally, and the messages for a missing workspace or missing credentials."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_RECIPE, subprocess_env

pytest.importorskip("azure.ai.ml", reason="the azureml extra (azure-ai-ml) is part of the test extra")

from finetune.cli import azureml  # noqa: E402
from finetune.recipe import RecipeError, load_recipe  # noqa: E402

SETTINGS = [
    "azureml.compute=gpu-a100",
    "azureml.instance_count=2",
    "azureml.gpus_per_node=4",
    "azureml.datastore=runsstore",
    "azureml.output_path=phi/run1",
]


def dry_run(tmp_path, stage, *overrides):
    recipe = load_recipe(TINY_RECIPE, [*SETTINGS, *overrides])
    path = azureml.write_job(recipe, stage, list(overrides), tmp_path)
    return azureml.load_job(path), path


def uri(stage):
    return f"azureml://datastores/runsstore/paths/phi/run1/{stage}/"


def check_command_job(job, stage, upstreams):
    assert job.type == "command"
    assert job.compute == "gpu-a100"  # the loader drops the azureml: prefix
    once = stage in ("export", "eval")  # no launcher: one process, or every GPU would write the same export
    assert job.resources.instance_count == (1 if once else 2)
    assert job.distribution.type == "pytorch" and job.distribution.process_count_per_instance == (1 if once else 4)
    # the stage runs as a local user runs it, once per process; Azure ML's distribution is the launcher
    assert f"python finetune/{stage}.py recipes/tiny_chat.yaml" in job.command
    assert "accelerate" not in job.command and "deepspeed" not in job.command
    assert set(job.outputs) == {stage}
    assert job.outputs[stage].path == uri(stage) and job.outputs[stage].mode == "rw_mount"
    assert f"cp -rL runs/tiny_chat/{stage}/. ${{{{outputs.{stage}}}}}" in job.command
    for earlier in upstreams:  # the earlier output sits where the local pipeline leaves it
        assert f"ln -sfn ${{{{inputs.{earlier}}}}} runs/tiny_chat/{earlier}" in job.command
    return {name: i for name, i in job.inputs.items()}


@pytest.mark.parametrize(
    "stage,upstreams",
    [
        ("sft", []),
        ("reward", ["sft"]),
        ("dpo", ["sft"]),
        ("ppo", ["sft", "reward"]),  # ppo.start_from: sft (a stage named: that stage's output)
    ],
)
def test_stage_dry_run_loads_with_the_sdk_and_says_what_the_recipe_says(tmp_path, stage, upstreams):
    job, path = dry_run(tmp_path, stage)
    inputs = check_command_job(job, stage, upstreams)
    assert set(inputs) == {*upstreams, "data_train_0", "data_eval_0"}
    for earlier in upstreams:
        assert inputs[earlier].type == "uri_folder" and inputs[earlier].path == uri(earlier)
    recipe = load_recipe(TINY_RECIPE)
    section = getattr(recipe, stage)
    for split in ("train", "eval"):
        data = inputs[f"data_{split}_0"]
        assert data.type == "uri_file"
        assert (path.parent / data.path).resolve() == Path(recipe.resolve_path(getattr(section.data, split)[0].path))
        assert f"{stage}.data.{split}=" in job.command and f"${{{{inputs.data_{split}_0}}}}" in job.command
    # the environment is built from the repository's Dockerfile, with the repository as its context
    assert job.environment.build.dockerfile_path == "azureml/Dockerfile"
    assert (path.parent / job.environment.build.path).resolve() == ROOT  # relative to the YAML, like code
    assert (path.parent / job.code).resolve() == ROOT
    assert job.environment_variables == {"PYTHONPATH": "."}


def test_export_dry_run_takes_the_adapter_chain(tmp_path):
    job, _ = dry_run(tmp_path, "export")
    # export.stage auto takes the last finished chat-model stage of the pipeline, known only when the job runs
    assert set(check_command_job(job, "export", ["sft", "dpo", "ppo"])) == {"sft", "dpo", "ppo"}


def test_start_keys_decide_the_inputs(tmp_path):
    job, _ = dry_run(tmp_path, "dpo", "dpo.start_from=none")
    assert "sft" not in job.inputs and "ln -s" not in job.command
    assert "dpo.start_from=none" in job.command
    recipe = load_recipe(
        TINY_RECIPE, ["ppo.start_from=runs/tiny_chat/sft", "ppo.reward_from=none", "ppo.reward_function=rewards:exact"]
    )
    assert azureml.stage_upstreams(recipe, "ppo") == ["sft"]
    absolute = [f"ppo.start_from={Path('runs/tiny_chat/sft').resolve()}", "ppo.reward_from=none"]
    absolute.append("ppo.reward_function=rewards:exact")
    assert azureml.stage_upstreams(load_recipe(TINY_RECIPE, absolute), "ppo") == ["sft"]  # the same folder
    after_dpo = load_recipe(TINY_RECIPE, ["ppo.start_from=dpo"])  # the Phi recipes' chaining, by stage name
    assert azureml.stage_upstreams(after_dpo, "ppo") == ["sft", "reward", "dpo"]
    with pytest.raises(RecipeError, match=r"ppo.start_from: '/elsewhere/adapter' is not an earlier stage's output"):
        azureml.stage_upstreams(load_recipe(TINY_RECIPE, ["ppo.start_from=/elsewhere/adapter"]), "ppo")


def test_hub_data_passes_through_and_a_registered_environment_is_named(tmp_path):
    hub = 'sft.data.train=[{"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"}]'
    job, _ = dry_run(tmp_path, "sft", hub, "azureml.environment=phi-finetune@latest")
    assert set(job.inputs) == {"data_eval_0"}  # only the local eval file is uploaded
    assert "HuggingFaceH4/ultrachat_200k" in job.command and job.environment == "phi-finetune@latest"
    with pytest.raises(RecipeError, match="azureml.environment: 'my env': name a registered environment"):
        dry_run(tmp_path, "sft", "azureml.environment=my env")


def test_pipeline_steps_pass_outputs_to_the_next_steps_inputs(tmp_path):
    recipe = load_recipe(TINY_RECIPE, SETTINGS)
    spec = azureml.pipeline_job_yaml(recipe, [], tmp_path, stages=["sft", "reward", "dpo", "ppo"])
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    job = azureml.load_job(path)
    assert job.type == "pipeline" and list(job.jobs) == ["sft", "reward", "dpo", "ppo"]
    assert job.settings.default_compute == "gpu-a100"
    assert {name: o.path for name, o in job.outputs.items()} == {s: uri(s) for s in ["sft", "reward", "dpo", "ppo"]}
    wiring = {
        (step, name): str(i._data)
        for step, node in job.jobs.items()
        for name, i in node.inputs.items()
        if not name.startswith("data_")
    }
    assert wiring == {
        ("reward", "sft"): "${{parent.jobs.sft.outputs.sft}}",
        ("dpo", "sft"): "${{parent.jobs.sft.outputs.sft}}",
        ("ppo", "sft"): "${{parent.jobs.sft.outputs.sft}}",
        ("ppo", "reward"): "${{parent.jobs.reward.outputs.reward}}",  # ppo.start_from: sft, not dpo
    }
    for step, node in job.jobs.items():
        assert node.distribution.process_count_per_instance == 4 and node.resources.instance_count == 2
        assert str(node.outputs[step]._data) == f"${{{{parent.outputs.{step}}}}}"


def test_pipeline_dry_run_through_the_command_line(tmp_path):
    job, _ = dry_run(tmp_path, "pipeline")
    assert list(job.jobs) == ["sft", "reward", "dpo", "ppo", "export", "eval", "register"]
    assert str(job.jobs["eval"].inputs["export"]._data) == "${{parent.jobs.export.outputs.export}}"


def test_phi2_pipeline_ends_by_registering_the_export_as_a_model(tmp_path, capsys):
    code = azureml.main(
        [
            "submit",
            str(ROOT / "recipes/phi2_chat.yaml"),
            "--stage",
            "pipeline",
            "--compute",
            "gpu-a100",
            "--dry-run",
            "--out",
            str(tmp_path),
            "azureml.model_version=7",
        ]
    )
    assert code == 0 and "validated with azure.ai.ml.load_job" in capsys.readouterr().out
    job = azureml.load_job(tmp_path / "phi2_chat-pipeline.yaml")
    assert list(job.jobs)[-1] == "register"
    model = job.outputs["register"]  # a named custom_model output: Azure ML registers it when the job completes
    assert (model.type, model.name, model.version) == ("custom_model", "phi2_chat", "7")
    step = job.jobs["register"]
    assert str(step.inputs["export"]._data) == "${{parent.jobs.export.outputs.export}}"
    assert str(step.outputs["model"]._data) == "${{parent.outputs.register}}"
    assert step.command.startswith("cp -rL ${{inputs.export}}/. ${{outputs.model}}")
    off = load_recipe(ROOT / "recipes/phi2_chat.yaml", ["azureml.compute=gpu", "azureml.register_model=false"])
    assert "register" not in azureml.pipeline_job_yaml(off, [], tmp_path)["jobs"]


def test_register_dry_run_of_a_local_export_validates_with_load_model(pipeline_run, tmp_path, capsys):
    export = pipeline_run["out"] / "export"
    code = azureml.main(["register", str(export), "--dry-run", "--out", str(tmp_path), "--model-name", "tiny-chat"])
    assert code == 0 and "validated with azure.ai.ml.load_model" in capsys.readouterr().out
    model = azureml.load_model(tmp_path / "tiny-chat-model.yaml")
    assert (model.name, model.type) == ("tiny-chat", "custom_model")
    assert (tmp_path / model.path).resolve() == export.resolve()  # the whole folder: card, template, metrics
    metrics = json.loads((export / "metrics.json").read_text())
    assert model.tags["correct_rate_after"] == f"{metrics['correct_rate_after']:.4g}"
    assert model.tags["base_model"] == "builtin:tiny-phi" and model.tags["stage"] == "ppo"
    # from the recipe: its export folder, named after the run
    code = azureml.main(
        ["register", str(TINY_RECIPE), f"output_dir={pipeline_run['out']}", "--dry-run", "--out", str(tmp_path)]
    )
    assert code == 0 and azureml.load_model(tmp_path / "run-model.yaml").name == "run"


def test_register_without_an_export_or_credentials_says_what_to_do(pipeline_run, tmp_path, monkeypatch, capsys):
    from azure.identity import CredentialUnavailableError

    code = azureml.main(["register", str(TINY_RECIPE), f"output_dir={tmp_path}", "--dry-run", "--out", str(tmp_path)])
    assert code == 2 and "no finished export in" in capsys.readouterr().err

    class NoCredential:
        def __init__(self, *args, **kwargs):
            pass

        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token")

    monkeypatch.setattr("azure.identity.DefaultAzureCredential", NoCredential)
    monkeypatch.setattr("azure.ai.ml.MLClient", lambda *a, **k: pytest.fail("no client without a credential"))
    ids = ["--subscription", "00000000-0000-0000-0000-000000000000", "--resource-group", "rg", "--workspace", "ws"]
    code = azureml.main(["register", str(pipeline_run["out"] / "export"), *ids, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "No Azure credentials found" in err and "az login" in err
    assert len(err.strip().splitlines()) == 1  # one paragraph


def test_the_job_command_runs_locally_as_the_local_stage_command(tmp_path, monkeypatch):
    """Build the sft job, then run its command string here with the inputs and output mounted as
    local paths, inside a fake Azure ML run: it trains, hands the adapter to the job output and logs
    its metrics to MLflow."""
    run = tmp_path / "run"
    overrides = ["sft.max_steps=2", "sft.eval_generate_rows=2", "logging.logging_steps=1", f"output_dir={run}"]
    recipe = load_recipe(TINY_RECIPE, [*SETTINGS, *overrides])
    job = azureml.build_stage_job(recipe, "sft", overrides, tmp_path)
    assert job.local_command[:3] == ["python", "finetune/sft.py", "recipes/tiny_chat.yaml"]
    command = job.spec["command"]
    assert shlex.join(job.local_command) in command
    mounted = tmp_path / "outputs_sft"
    mounted.mkdir()
    local = command.replace("${{outputs.sft}}", str(mounted))
    for name, spec in job.spec["inputs"].items():
        local = local.replace(f"${{{{inputs.{name}}}}}", str((tmp_path / spec["path"]).resolve()))
    assert "${{" not in local
    env = {
        **subprocess_env(),
        "AZUREML_RUN_ID": "local-test",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_EXPERIMENT_NAME": "finetune",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }  # a local stand-in for the run
    proc = subprocess.run(["bash", "-c", local], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((mounted / "metrics.json").read_text())
    assert metrics["global_steps"] == 2
    assert (mounted / "adapter_model.safetensors").is_file() and (run / "sft").is_dir()
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 opens a file store only when asked
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert run.data.tags["finetune.stage"] == "sft" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.data.metrics["final/global_steps"] == 2


def test_submit_without_a_workspace_says_how_to_name_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no config.json here
    code = azureml.main(
        ["submit", str(TINY_RECIPE), "--stage", "sft", "--compute", "gpu", "--out", str(tmp_path), "sft.max_steps=2"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "No Azure ML workspace given" in err and "--config PATH" in err and "azureml.workspace_name" in err
    assert "sft.max_steps=2" in (tmp_path / "tiny_chat-sft.yaml").read_text()  # overrides may follow the flags


def test_submit_without_credentials_says_what_to_do(tmp_path, monkeypatch, capsys):
    from azure.identity import CredentialUnavailableError

    class NoCredential:  # what DefaultAzureCredential raises when no sign-in of any kind is found
        def __init__(self, *args, **kwargs):
            pass

        def get_token(self, *scopes, **kwargs):
            raise CredentialUnavailableError("DefaultAzureCredential failed to retrieve a token")

    monkeypatch.setattr("azure.identity.DefaultAzureCredential", NoCredential)
    monkeypatch.setattr("azure.ai.ml.MLClient", lambda *a, **k: pytest.fail("no client without a credential"))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"subscription_id": "00000000-0000-0000-0000-000000000000", "resource_group": "rg", "workspace_name": "ws"}
        )
    )
    code = azureml.main(
        [
            "submit",
            str(TINY_RECIPE),
            "--stage",
            "sft",
            "--compute",
            "gpu",
            "--config",
            str(config),
            "--out",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "No Azure credentials found" in err and "az login" in err and "--dry-run" in err
    assert len(err.strip().splitlines()) == 1  # one paragraph


def test_missing_compute_and_outside_recipe_are_recipe_errors(tmp_path, capsys):
    code = azureml.main(["submit", str(TINY_RECIPE), "--stage", "sft", "--dry-run", "--out", str(tmp_path)])
    assert code == 2 and "azureml.compute: no compute cluster named" in capsys.readouterr().err
    outside = tmp_path / "mine.yaml"
    outside.write_text(TINY_RECIPE.read_text().replace("../data/", f"{ROOT}/data/"))
    with pytest.raises(RecipeError, match="recipe: .* is outside the repository"):
        azureml.write_job(load_recipe(outside, ["azureml.compute=gpu"]), "sft", [], tmp_path)


def test_no_secret_or_workspace_id_in_the_yaml(tmp_path):
    _, path = dry_run(
        tmp_path,
        "ppo",
        "azureml.subscription_id=11111111-2222-3333-4444-555555555555",
        "azureml.resource_group=rg-secretive",
        "azureml.workspace_name=ws-x",
    )
    text = path.read_text()
    assert "11111111" not in text and "rg-secretive" not in text and "ws-x" not in text


def test_dockerfile_installs_the_torch_range_ci_runs():
    dockerfile = (ROOT / "azureml" / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_range = re.search(r'"(torch>=[^"]+)"', pyproject).group(1)
    assert f'"{torch_range}"' in dockerfile
    assert '".[azureml-job,eval,azureml-serve]"' in dockerfile and "azureml-mlflow" in pyproject


def test_phi2_pipeline_dry_run_has_every_training_stage_and_the_sdk_accepts_it(tmp_path, capsys):
    """`finetune azureml submit recipes/phi2_chat.yaml --stage pipeline --compute gpu-a100 --dry-run`: the six
    training stages (PPO and GRPO both) in order on 8 GPUs each (export once), then the benchmark and
    registration steps."""
    phi2 = ROOT / "recipes" / "phi2_chat.yaml"
    code = azureml.main(
        ["submit", str(phi2), "--stage", "pipeline", "--compute", "gpu-a100", "--dry-run", "--out", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    job = azureml.load_job(tmp_path / "phi2_chat-pipeline.yaml")
    assert list(job.jobs) == ["sft", "reward", "dpo", "ppo", "grpo", "export", "eval", "register"]
    for step in ("sft", "reward", "dpo", "ppo", "export"):
        node = job.jobs[step]
        assert node.distribution.process_count_per_instance == (1 if step == "export" else 8)  # the recipe's node
        assert f"python finetune/{step}.py recipes/phi2_chat.yaml" in node.command
        assert not any(name.startswith("data_") for name in node.inputs)  # hub data sets pass through by id
    assert str(job.jobs["ppo"].inputs["reward"]._data) == "${{parent.jobs.reward.outputs.reward}}"
    assert str(job.jobs["export"].inputs["ppo"]._data) == "${{parent.jobs.ppo.outputs.ppo}}"
