"""Public data sets as they ship, read without edits: ultrachat_200k, ultrafeedback_binarized, Anthropic HH,
ShareGPT and Alpaca, each from fixtures in exactly the public schema (tests/public_data.py), through the
code path a hub id takes (read_source -> datasets.load_dataset)."""

import pytest

from finetune.core.data import DataError, from_hh, to_conversation, to_preference, to_prompt, train_eval_rows
from finetune.recipe import validate_recipe
from tests import public_data as pd

CONVERT = {"sft": to_conversation, "dpo": to_preference, "ppo": to_prompt}


def rows_of(tmp_path, stage, train, eval_=None, **data):
    section = {"train": train, "eval": eval_ or train, **data}
    recipe = validate_recipe(
        {"output_dir": "o", "model": {"name_or_path": "x"}, stage: {"data": section}}, source=str(tmp_path / "r.yaml")
    )
    return train_eval_rows(recipe.section(stage).data, recipe, 0, CONVERT[stage])


U = {"role": "user"}


def test_ultrachat_folder_splits_read_as_on_the_hub(tmp_path):
    folder = pd.ultrachat_folder(tmp_path / "ultrachat_200k", train=12, test=4)
    train, evals, report, _ = rows_of(
        tmp_path,
        "sft",
        [{"path": "ultrachat_200k", "split": "train_sft"}],
        [{"path": str(folder), "split": "test_sft"}],
    )
    assert report.read == 12 and len(train) == 12 and len(evals) == 4
    first = next(r for r in train if r["where"].endswith("row 1"))
    assert first["messages"] == pd.ultrachat_rows(1)[0]["messages"]  # all four turns, roles and contents kept
    assert "ultrachat_200k[train_sft]: row 1" in first["where"]
    prompts, _, _, _ = rows_of(tmp_path, "ppo", [{"path": "ultrachat_200k", "split": "train_gen"}])
    assert all(p["prompt"][-1]["role"] == "user" for p in prompts) and len(prompts) == 6
    with pytest.raises(DataError, match=r"ultrachat_200k: cannot read split 'train' of this dataset folder"):
        rows_of(tmp_path, "sft", [{"path": "ultrachat_200k"}])


def test_ultrafeedback_whole_conversations_become_prompt_and_replies(tmp_path):
    pd.ultrafeedback_folder(tmp_path / "uf", train=8, test=4)
    train, evals, report, _ = rows_of(
        tmp_path, "dpo", [{"path": "uf", "split": "train_prefs"}], [{"path": "uf", "split": "test_prefs"}]
    )
    raw = pd.ultrafeedback_rows(1)[0]
    first = next(r for r in train if r["where"].endswith("row 1"))
    assert first["prompt"] == [{"role": "user", "content": raw["prompt"]}]
    assert first["chosen"] == [raw["chosen"][1]] and first["rejected"] == [raw["rejected"][1]]
    assert report.read == 8 and len(train) == 8 and len(evals) == 4
    # the same rows feed SFT (messages = chosen) and PPO (the prompt)
    sft, _, _, _ = rows_of(tmp_path, "sft", [{"path": "uf", "split": "train_prefs"}])
    assert sorted(len(r["messages"]) for r in sft) == [2] * 8
    ppo, _, _, _ = rows_of(tmp_path, "ppo", [{"path": "uf", "split": "train_gen"}])
    assert {r["prompt"][0]["content"] for r in ppo} == {r["prompt"] for r in pd.ultrafeedback_rows(4, offset=2000)}
    assert {"prompt_id", "score_chosen", "score_rejected"} <= set(ppo[0]["example"])  # rule rewards can read them


def test_ultrafeedback_prompt_that_is_not_the_conversations_prompt_is_refused():
    row = pd.ultrafeedback_rows(1)[0] | {"prompt": "Something else?"}
    with pytest.raises(DataError, match="f: row 1: chosen and rejected are whole conversations, but their last shared"):
        to_preference(row, "auto", "f: row 1")


def test_hh_transcripts_split_into_turns_and_shared_prompt(tmp_path):
    pd.write_jsonl(tmp_path / "hh.jsonl", pd.hh_rows(6))
    train, _, report, _ = rows_of(tmp_path, "dpo", [{"path": "hh.jsonl"}])
    assert report.read == 6 and len(train) == 6
    row = to_preference(pd.hh_rows(2)[1], "auto", "hh: row 2")  # with an earlier exchange
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["prompt"][1]["content"] == "Hi, how can I help?" and row["chosen"][0]["content"] == pd._qa(1)[1]
    assert to_preference(pd.hh_rows(2)[1], "hh", "x") == row  # named or detected: the same
    sft, _, _, _ = rows_of(tmp_path, "sft", [{"path": "hh.jsonl", "format": "hh"}])
    assert all(r["messages"][-1]["role"] == "assistant" for r in sft)  # SFT on the chosen transcript
    with pytest.raises(DataError, match="x: chosen has text before its first 'Human:' turn"):
        from_hh({"chosen": "Hi\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "x")


def test_sharegpt_rows_map_human_gpt_system(tmp_path):
    pd.write_parquet(tmp_path / "sharegpt.parquet", pd.sharegpt_rows(4))
    train, _, report, _ = rows_of(tmp_path, "sft", [{"path": "sharegpt.parquet"}])
    by_len = sorted(train, key=lambda r: len(r["messages"]))
    assert [m["role"] for m in by_len[-1]["messages"]] == ["system", "user", "assistant"]
    assert report.read == 4 and len(train) == 4
    ppo, _, _, _ = rows_of(tmp_path, "ppo", [{"path": "sharegpt.parquet", "format": "sharegpt"}])
    assert all(r["prompt"][-1]["role"] == "user" for r in ppo) and "conversations" not in ppo[0]["example"]
    bad = {"conversations": [{"from": "narrator", "value": "x"}]}
    with pytest.raises(DataError, match=r"r: conversations\[0\]: unknown speaker 'narrator'; ShareGPT rows use"):
        to_conversation(bad, "auto", "r")
    with pytest.raises(DataError, match="this stage needs preference rows .* these rows are sharegpt"):
        to_preference(pd.sharegpt_rows(1)[0], "auto", "r")


def test_alpaca_instruction_and_input_make_the_prompt(tmp_path):
    pd.write_jsonl(tmp_path / "alpaca.jsonl", pd.alpaca_rows(4))
    train, _, report, _ = rows_of(tmp_path, "sft", [{"path": "alpaca.jsonl", "format": "alpaca"}])
    assert report.read == 4
    q, good, _ = pd._qa(1)
    row = next(r for r in train if r["messages"][1]["content"] == good)
    assert row["messages"][0] == {"role": "user", "content": f"{q}\n\nUse digits."}
    q0, good0, _ = pd._qa(0)
    assert to_conversation(pd.alpaca_rows(1)[0], "auto", "r")["messages"] == [  # empty input: instruction alone
        {"role": "user", "content": q0},
        {"role": "assistant", "content": good0},
    ]
    with pytest.raises(DataError, match="r: missing field 'output'"):
        to_conversation({"instruction": "x"}, "alpaca", "r")
