"""core.fingerprints: what an output is made from, as content. A moved file is the same data, one changed byte is
not; settings that only say how a run saves or logs leave the fingerprint alone, a learning rate does not; the hash
cache re-hashes a file whose size or modification time changed; `changes` says what differs in recipe words."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.core import fingerprints
from finetune.core.fingerprints import (
    HASH_CACHE,
    NOT_PART_OF_THE_RESULT,
    Hashes,
    adapter_hash,
    adapter_record,
    changes,
    digest,
    made_from,
    sha256_file,
)
from finetune.recipe import load_recipe

ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(6)
]
TEMPLATE = "{{ messages }}"


def write_data(path: Path, rows=ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_at(tmp_path: Path, data: str, name: str = "recipe.yaml", top: dict | None = None, **sft):
    """A recipe in `tmp_path` whose SFT stage trains on `data` (relative to the recipe); `sft`: its section keys,
    `top`: other sections."""
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "builtin:tiny-phi"},
        "training": {"learning_rate": 2.0e-3, "save_steps": 25},
        "sft": {"data": {"train": [{"path": data}]}, **sft},
        **(top or {}),
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def sft_made_from(recipe, template=TEMPLATE, inputs=None):
    return made_from(recipe, "sft", inputs or {}, template)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(fingerprints, "_hashes", {})  # one cache per process: each test starts with none


# ----------------------------------------------------------------------------- data is its content


def test_a_moved_data_file_with_the_same_content_is_the_same_data(tmp_path):
    write_data(tmp_path / "data" / "train.jsonl")
    before = sft_made_from(recipe_at(tmp_path, "data/train.jsonl"))
    shutil.move(tmp_path / "data", tmp_path / "elsewhere")
    after = sft_made_from(recipe_at(tmp_path, "elsewhere/train.jsonl"))
    assert after["data"] == before["data"] and digest(after) == digest(before)
    assert changes(before, after, "sft") == []


def test_one_changed_byte_is_other_data_and_is_named(tmp_path):
    path = write_data(tmp_path / "train.jsonl")
    before = sft_made_from(recipe_at(tmp_path, "train.jsonl"))
    text = path.read_bytes()
    path.write_bytes(text.replace(b"What is 3", b"What is 4"))  # same size, one byte differs
    assert path.stat().st_size == len(text)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    after = sft_made_from(recipe_at(tmp_path, "train.jsonl"))
    assert digest(after) != digest(before)
    assert changes(before, after, "sft") == ["the data of sft.data.train changed"]


def test_a_data_folder_is_its_files_content(tmp_path):
    folder = tmp_path / "ds"
    write_data(folder / "train.jsonl")
    hashes = Hashes()
    first = hashes.tree(folder)
    (folder / ".finetune").write_text("{}")  # hidden files and marks are not the data
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("y")
    assert hashes.tree(folder) == first
    (folder / "train.jsonl").rename(folder / "other.jsonl")  # a name is part of a folder's content
    assert hashes.tree(folder) != first
    assert hashes.tree(folder, (".parquet",)) == digest([])  # only the suffixes asked for


# ----------------------------------------------------------------------------- the hash cache


def test_the_cache_rehashes_when_size_or_mtime_change_and_only_then(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    hashes = Hashes(tmp_path)
    first = hashes.file(path)
    assert first == sha256_file(path)
    stat = path.stat()
    path.write_bytes(b"b" * 100)  # same size; put the old mtime back: the cache cannot tell, by design
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashes.file(path) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # mtime changed: hashed again
    assert hashes.file(path) == sha256_file(path) != first
    path.write_bytes(b"b" * 101)  # size changed
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert hashes.file(path) == sha256_file(path)


def test_the_cache_is_kept_in_the_folder_and_read_back(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights")
    hashes = Hashes(tmp_path)
    first = hashes.file(path)
    hashes.save()
    assert (tmp_path / HASH_CACHE).is_file()
    st = path.stat()
    path.write_bytes(b"WEIGHTS")  # same size, mtime put back: only the saved cache can give the old hash
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = Hashes(tmp_path)
    assert again.file(path) == first and not again.changed


def test_a_damaged_or_unwritable_cache_never_fails_a_run(tmp_path):
    (tmp_path / HASH_CACHE).write_text("{damaged")
    hashes = Hashes(tmp_path)
    assert hashes.known == {}
    (tmp_path / "f").write_text("x")
    assert hashes.file(tmp_path / "f") == sha256_file(tmp_path / "f")
    hashes.path = tmp_path / "missing-folder" / HASH_CACHE  # its folder gone: nothing written, nothing raised
    hashes.save()
    assert hashes.file(tmp_path / "absent") is None and sha256_file(tmp_path / "absent") is None
    Hashes().save()  # no folder: not kept


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("key", ["save_steps", "save_total_limit", "resume", "logging_first_step", "run_name"])
def test_keys_that_do_not_shape_the_result_leave_the_fingerprint_alone(tmp_path, key):
    assert key in NOT_PART_OF_THE_RESULT
    write_data(tmp_path / "train.jsonl")
    value = {"save_steps": 7, "save_total_limit": 3, "resume": False, "logging_first_step": True, "run_name": "x"}[key]
    before = sft_made_from(recipe_at(tmp_path, "train.jsonl"))
    after = sft_made_from(recipe_at(tmp_path, "train.jsonl", "other.yaml", **{key: value}))
    assert digest(after) == digest(before)


def test_a_learning_rate_changes_the_fingerprint_and_is_named_in_recipe_words(tmp_path):
    write_data(tmp_path / "train.jsonl")
    before = sft_made_from(recipe_at(tmp_path, "train.jsonl"))
    after = sft_made_from(recipe_at(tmp_path, "train.jsonl", "other.yaml", learning_rate=1.0e-3))
    assert digest(after) != digest(before)
    assert changes(before, after, "sft") == ["sft.learning_rate: unset -> 0.001"]


def test_a_shared_training_setting_is_named_with_its_section(tmp_path):
    write_data(tmp_path / "train.jsonl")
    recipe = recipe_at(tmp_path, "train.jsonl")
    before = sft_made_from(recipe)
    changed = recipe.model_copy(update={"training": {**recipe.training, "learning_rate": 1.0e-3}, "seed": 7})
    after = sft_made_from(changed)
    assert changes(before, after, "sft") == ["seed: 42 -> 7", "training.learning_rate: 0.002 -> 0.001"]


def test_settings_outside_the_stages_section_are_named_by_their_recipe_keys(tmp_path):
    write_data(tmp_path / "train.jsonl")
    recipe = recipe_at(tmp_path, "train.jsonl")
    (tmp_path / "acc.yaml").write_text("num_processes: 2\n")
    launch = recipe.launch.model_copy(update={"num_processes": 2, "accelerate_config": "acc.yaml"})
    before, after = sft_made_from(recipe), sft_made_from(recipe.model_copy(update={"launch": launch}))
    said = changes(before, after, "sft")
    assert said[0].startswith("launch.accelerate_config: unset -> sha256 ")  # the config file's content
    assert said[1:] == ["launch.num_processes: unset -> 2"]


def test_the_samples_data_is_named_by_its_recipe_key(tmp_path):
    write_data(tmp_path / "train.jsonl")
    samples = write_data(tmp_path / "samples.jsonl")
    top = {"samples": {"data": [{"path": "samples.jsonl"}]}}
    before = sft_made_from(recipe_at(tmp_path, "train.jsonl", top=top))
    write_data(samples, ROWS[:2])
    after = sft_made_from(recipe_at(tmp_path, "train.jsonl", top=top))
    assert changes(before, after, "sft") == ["the data of samples.data changed"]


def test_the_template_base_and_inputs_are_named(tmp_path):
    write_data(tmp_path / "train.jsonl")
    recipe = recipe_at(tmp_path, "train.jsonl")
    before = sft_made_from(recipe, inputs={"start_from": [{"sha256": "a" * 64}]})
    after = sft_made_from(recipe, template=TEMPLATE + " ", inputs={"start_from": [{"sha256": "b" * 64}]})
    after["base"] = {**after["base"], "sha256": "c" * 64}
    assert changes(before, after, "sft") == [
        "the base model changed (its files' content)",
        "sft.start_from (the adapters it starts from) was made again",
        "the chat template changed",
    ]


def test_the_shipped_base_is_recorded_by_its_files_content(tmp_path, tiny_base):
    write_data(tmp_path / "train.jsonl")
    base = sft_made_from(recipe_at(tmp_path, "train.jsonl"))["base"]
    assert base["name"] == "builtin:tiny-phi"
    assert base["sha256"] == Hashes().tree(tiny_base, fingerprints.WEIGHT_FILES)


def test_a_local_base_with_other_weights_at_the_same_path_is_another_base(tmp_path, tiny_base):
    local = tmp_path / "base"
    shutil.copytree(tiny_base, local)
    write_data(tmp_path / "train.jsonl")
    recipe = recipe_at(tmp_path, "train.jsonl")
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": str(local)})})
    before = sft_made_from(recipe)
    config = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    after = sft_made_from(recipe)
    assert before["base"]["name"] == after["base"]["name"] and digest(before) != digest(after)
    assert changes(before, after, "sft") == ["the base model changed (its files' content)"]


# ----------------------------------------------------------------------------- adapters


def test_an_adapter_is_recorded_relative_to_the_output_with_its_content(tmp_path):
    adapter = tmp_path / "run" / "sft"
    adapter.mkdir(parents=True)
    assert adapter_hash(adapter) is None  # no weights: no adapter
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    (adapter / "adapter_config.json").write_text("{}")
    record = adapter_record(adapter, tmp_path / "run" / "dpo")
    assert record == {"path": "../sft", "absolute": str(adapter.resolve()), "sha256": adapter_hash(adapter)}
    (adapter / "adapter_config.json").write_text('{"r": 8}')  # the config is part of the adapter too
    assert adapter_hash(adapter) != record["sha256"]


def test_a_hash_in_a_change_is_shown_short():
    old = {"settings": {"deepspeed": "a" * 64}}
    new = {"settings": {"deepspeed": "b" * 64}}
    assert changes(old, new, "sft") == [f"deepspeed: sha256 {'a' * 12} -> sha256 {'b' * 12}"]


def test_an_adapter_is_the_same_content_whatever_order_peft_listed_its_modules(tmp_path):
    """PEFT writes target_modules (a set) in the saving process's hash order: two nodes saving the same adapter
    write the lists in different orders, which must not read as different adapters; another rank must."""
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "fc2"], "modules_to_save": None}
    for name, modules in (("a", ["q_proj", "k_proj", "fc2"]), ("b", ["fc2", "q_proj", "k_proj"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"same weights")
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, "target_modules": modules}))
    assert adapter_hash(tmp_path / "a") == adapter_hash(tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert adapter_hash(tmp_path / "a") != adapter_hash(tmp_path / "b")
