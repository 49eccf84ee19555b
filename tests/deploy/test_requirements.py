"""What a user sees before any GGUF work starts: the missing extra named once, an unknown type refused."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_RECIPE


def test_missing_extra_is_one_clear_message(monkeypatch):
    import importlib.util

    from finetune.deploy import gguf
    from finetune.deploy.llamacpp import DeployError

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find(name, *a))
    with pytest.raises(DeployError, match=r"pip install 'finetune\[gguf\]'"):
        gguf.check_installed()


def test_unknown_gguf_type_is_refused_with_the_valid_ones():
    from finetune.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="unknown GGUF type.*q4_k_m"):
        load_recipe(TINY_RECIPE, ["export.gguf=[q9_9]"])
    assert load_recipe(TINY_RECIPE, ["export.gguf=Q8_0,q4_k_m"]).export.gguf == ["q8_0", "q4_k_m"]
