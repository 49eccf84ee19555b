"""The tiny base shipped in the package: what produced it matches the build code, builtin:tiny-phi loads it
with nothing built or written, the package data ships it, and the build command reproduces a build."""

import fnmatch
import json
import tomllib

import pytest

from finetune import tiny
from finetune.cli import tiny as build
from finetune.core import ownership
from tests.conftest import ROOT


def test_shipped_base_record_matches_the_build_code():
    record = tiny.build_record()
    expected = {
        "build_key": build._build_key(record["steps"], record["seed"]),
        "build_version": tiny.BUILD_VERSION,
        "steps": tiny.PRETRAIN_STEPS,
        "seed": 0,
        "threads": tiny.BUILD_THREADS,
    }
    got = {k: record[k] for k in expected}
    assert got == expected, (
        f"finetune/tiny/base/{tiny.RECORD} says the shipped base was built from {got}, but the build code now "
        f"makes {expected}: the corpus, the model config or the build changed without a rebuild; "
        f"{tiny.rebuild_hint()}"
    )
    assert build.sha256_file(tiny.BASE_DIR / "model.safetensors") == record["model_sha256"], (
        f"finetune/tiny/base/model.safetensors is not the file its build record describes; {tiny.rebuild_hint()}"
    )
    for key in ("torch", "transformers", "cpu_capability", "loss_per_100_steps"):
        assert record[key], f"the build record lacks {key}"


def test_builtin_tiny_phi_loads_the_shipped_base_without_building_or_writing(tmp_path, monkeypatch):
    from finetune.core.modeling import load_model, load_tokenizer, resolve_model_path
    from finetune.recipe import validate_recipe

    cache, home = tmp_path / "cache", tmp_path / "home"
    cache.mkdir(), home.mkdir()
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))  # where an older finetune built and cached it
    monkeypatch.setenv("HOME", str(home))

    def no_build(*args, **kwargs):
        raise AssertionError("builtin:tiny-phi must load the shipped base, not build one")

    monkeypatch.setattr(build, "pretrain", no_build)
    monkeypatch.setattr(build, "build", no_build)
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny.BASE_DIR.iterdir()}

    assert resolve_model_path("builtin:tiny-phi") == str(tiny.BASE_DIR)
    recipe = validate_recipe({"output_dir": str(tmp_path / "out"), "model": {"name_or_path": "builtin:tiny-phi"}})
    model, tokenizer = load_model(recipe), load_tokenizer(recipe)
    assert model.config.num_hidden_layers == tiny.TINY_CONFIG["num_hidden_layers"]
    assert tokenizer.eos_token == tiny.EOS and len(tokenizer) == model.config.vocab_size

    assert not any(cache.iterdir()) and not any(home.iterdir()) and not (tmp_path / "out").exists()
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny.BASE_DIR.iterdir()} == before


def test_package_data_ships_every_file_of_the_base():
    """`pip install .` (not only an editable install) must carry the base: setuptools includes non-Python
    files only through package-data globs."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["finetune"]
    files = [p.relative_to(ROOT / "finetune").as_posix() for p in tiny.BASE_DIR.iterdir()]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), (files, globs)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", tiny.RECORD} <= {
        p.rsplit("/", 1)[-1] for p in files
    }


def test_missing_base_is_a_clear_error(tmp_path, monkeypatch):
    from finetune.errors import UserError

    monkeypatch.setattr(tiny, "BASE_DIR", tmp_path / "base")
    with pytest.raises(UserError, match=r"shipped base is missing.*pip install \..*finetune tiny build"):
        tiny.base_path()


def test_build_command_is_deterministic_and_records_what_made_it(tmp_path):
    """A short build (3 steps) twice: bit-identical weights, and the record the shipped base also has."""
    for name in ("a", "b"):
        assert build.main(["build", str(tmp_path / name), "--steps", "3", "--threads", "1"]) == 0
    a, b = (json.loads((tmp_path / n / tiny.RECORD).read_text()) for n in ("a", "b"))
    assert a["model_sha256"] == b["model_sha256"] == build.sha256_file(tmp_path / "a" / "model.safetensors")
    assert a["build_key"] == build._build_key(3, 0) != tiny.build_record()["build_key"]
    assert a["threads"] == 1 and a["steps"] == 3 and len(a["loss_per_100_steps"]) == 1
    built = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != ownership.MARK)  # finetune may replace it
    assert built == sorted(p.name for p in tiny.BASE_DIR.iterdir())
    assert build.main(["build", str(tmp_path / "a"), "--steps", "3"]) == 2  # exists: refused without --force
