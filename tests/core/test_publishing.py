"""Where the exported model goes: the Hugging Face Hub (`finetune export --push-to-hub`, failing fast and
leaving the export intact when the hub cannot be reached) and a managed online endpoint (azureml/score.py
serving the export as plain transformers loads it). Uses the session's pipeline run."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from tests.conftest import PIPELINE_QUICK, ROOT, TINY_RECIPE

pytestmark = pytest.mark.timeout(2400)  # the first test here may pay for the session's pipeline run


def fingerprint(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "env,message",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        # an address that drops packets (RFC 5737 TEST-NET-1): without the connect check this would hang
        ({"HF_ENDPOINT": "http://192.0.2.1", "HF_TOKEN": "hf_test_not_a_token"}, "did not answer within 3s"),
    ],
)
@pytest.mark.timeout(60)
def test_push_to_hub_offline_fails_fast_and_keeps_the_export(pipeline_run, monkeypatch, capsys, env, message):
    from finetune import export

    folder = pipeline_run["out"] / "export"
    before = fingerprint(folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = [str(TINY_RECIPE), f"output_dir={pipeline_run['out']}", *PIPELINE_QUICK, "--push-to-hub", "me/tiny-chat"]
    assert export.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert f"The export in {folder} is complete and untouched" in err and "hf upload me/tiny-chat" in err
    assert fingerprint(folder) == before


@pytest.mark.timeout(60)
def test_push_to_hub_pushes_as_is_only_an_export_folder(pipeline_run, monkeypatch, capsys):
    """export.output naming a stage folder with --push-to-hub: refused as an export target (that folder is not
    an export), never uploaded as if it were one."""
    from finetune import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sft = pipeline_run["out"] / "sft"
    before = fingerprint(sft)
    args = [str(TINY_RECIPE), f"output_dir={pipeline_run['out']}", f"export.output={sft}", "--push-to-hub", "me/x"]
    assert export.main(args) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" not in err and "Traceback" not in err and str(sft) in err
    assert fingerprint(sft) == before


def test_push_to_hub_flag_is_the_recipe_key_and_private_by_default():
    from finetune.recipe import load_recipe

    recipe = load_recipe(TINY_RECIPE, ["export.push_to_hub=me/tiny-chat"])
    assert recipe.export.push_to_hub == "me/tiny-chat" and recipe.export.hub_private is True


def test_endpoint_scoring_script_serves_the_export(pipeline_run, monkeypatch, tmp_path):
    import shutil

    folder = tmp_path / "model" / "export"  # Azure ML puts the registered folder, by its name, in the model dir
    shutil.copytree(pipeline_run["out"] / "export", folder)
    spec = importlib.util.spec_from_file_location("score", ROOT / "azureml" / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(folder.parent))
    score.init()
    question = json.loads((ROOT / "data/tiny/sft_eval.jsonl").read_text().splitlines()[0])
    reply = score.run(json.dumps({"messages": question["messages"][:1], "max_new_tokens": 8}))
    assert reply["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] <= 8
    assert reply == score.run(json.dumps({"input_data": {"prompt": question["messages"][0]["content"]}}))
    assert isinstance(reply["reply"], str) and "<|endoftext|>" not in reply["reply"]
