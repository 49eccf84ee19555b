"""core.hub: a missing local path, a hub id with no network and a repo that is not there are each one message
naming the recipe key and the fix; offline, loads run in offline mode (the cache or an immediate failure).
No test here reaches the network: the probe is tried against sockets on this machine."""

from __future__ import annotations

import errno
import socket

import pytest
from huggingface_hub import constants

from finetune.core import hub
from finetune.core.hub import check_local_model, hub_load, looks_like_hub_id, offline_reason
from finetune.recipe import RecipeError


@pytest.mark.parametrize("name", ["microsoft/phi-2", "gpt2", "HuggingFaceH4/ultrachat_200k", "a.b/c_d-1"])
def test_hub_ids(name):
    assert looks_like_hub_id(name)


@pytest.mark.parametrize("name", ["./model", "/models/phi", "~/phi", "a/../b", "runs/x/sft", "..", "my model", ""])
def test_paths_are_not_hub_ids(name):
    assert not looks_like_hub_id(name)


def test_a_model_path_that_is_not_a_folder_names_the_key_and_the_fix(tmp_path):
    missing = str(tmp_path / "phi-2")
    with pytest.raises(RecipeError) as e:
        check_local_model(missing, missing, "recipe.yaml")
    message = str(e.value)
    assert message.startswith(f"recipe.yaml: model.name_or_path: {missing}: no such folder")
    assert "looked up beside the recipe" in message and "give a hub id such as microsoft/phi-2" in message


def test_a_hub_id_or_an_existing_folder_passes(tmp_path):
    check_local_model("microsoft/phi-2", "microsoft/phi-2", "r.yaml")
    check_local_model("./base", str(tmp_path), "r.yaml")  # found (beside the recipe): resolved is a folder


def test_hf_hub_offline_is_a_reason(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert offline_reason() == "HF_HUB_OFFLINE is set"


def test_the_probe_says_a_closed_port_cannot_be_reached_and_an_open_one_answers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: the connection is refused at once
        assert "cannot reach 127.0.0.1" in hub._probe(f"http://127.0.0.1:{closed}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert hub._probe(f"http://127.0.0.1:{s.getsockname()[1]}") is None


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setattr(hub, "offline_reason", lambda: "no network")


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.setattr(hub, "offline_reason", lambda: None)


def test_offline_a_hub_load_runs_in_offline_mode_and_restores_it(offline):
    import datasets.config

    before = constants.HF_HUB_OFFLINE
    with hub_load("model.name_or_path", "microsoft/phi-2", "r.yaml"):
        assert constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


def test_offline_a_model_not_in_the_cache_says_offline_and_what_to_do(offline):
    with pytest.raises(RecipeError) as e, hub_load("model.name_or_path", "microsoft/phi-2", "r.yaml"):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    message = str(e.value)
    assert message.startswith("r.yaml: model.name_or_path: microsoft/phi-2 is a hub id and the hub is offline (no net")
    assert "not in the local cache" in message and "hf download" in message and "point model.name_or_path" in message


def test_online_a_repo_that_is_not_there_names_the_key_and_the_check(online):
    with pytest.raises(RecipeError) as e, hub_load("sft.data.train[0].path", "me/no-such-data", "r.yaml"):
        raise OSError("me/no-such-data is not a local folder and is not a valid model identifier\nmore lines")
    message = str(e.value)
    assert message.startswith("r.yaml: sft.data.train[0].path: cannot load me/no-such-data from the hub (")
    assert "more lines" not in message  # the first line of the library's message only
    assert "check the id" in message and "hf auth login" in message


def test_a_local_path_that_fails_to_load_is_not_blamed_on_the_hub(online, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(RecipeError) as e, hub_load("model.name_or_path", str(folder), "r.yaml"):
        raise OSError("no file named config.json")
    assert str(e.value) == f"r.yaml: model.name_or_path: cannot load {folder} (no file named config.json)"


def test_a_full_disk_passes_through_to_be_reported_as_one(online):
    with pytest.raises(OSError) as e, hub_load("model.name_or_path", "microsoft/phi-2", "r.yaml"):
        raise OSError(errno.ENOSPC, "No space left on device", "/root/.cache/huggingface/x")
    assert not isinstance(e.value, RecipeError) and e.value.errno == errno.ENOSPC


def test_the_error_class_is_the_callers(online):
    class DataError(RecipeError):
        pass

    with pytest.raises(DataError), hub_load("sft.data.train[0].path", "me/data", "r.yaml", error=DataError):
        raise ConnectionError("reset by peer")


def test_a_path_is_never_probed(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "offline_reason", lambda: pytest.fail("a local path asked whether the hub answers"))
    with hub_load("model.name_or_path", str(tmp_path), "r.yaml"):
        pass
