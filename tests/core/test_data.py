import json

import pytest

from finetune.chat_template import load_template
from finetune.core.data import DataError, DataReport, tokenize_conversations, train_eval_rows
from finetune.recipe import validate_recipe
from tests.conftest import ROOT, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def recipe_for(tmp_path, train, **data):
    return validate_recipe(
        {"output_dir": "o", "model": {"name_or_path": "builtin:tiny-phi"}, "sft": {"data": {"train": train, **data}}},
        source=str(tmp_path / "r.yaml"),
    )


def load(tmp_path, rows, name="d.jsonl", **data):
    write_jsonl(tmp_path / name, rows)
    r = recipe_for(tmp_path, [{"path": name}], **data)
    return train_eval_rows(r.sft.data, r, seed=0)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "row 2: messages[0]: unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},
            "row 2: messages[0]: empty user content",
        ),
        ({"messages": [{"role": "user", "content": {"a": 3}}]}, "row 2: messages[0]: content must be text, got a dict"),
        ({"messages": [{"role": "user"}]}, "row 2: messages[0] needs 'role' and 'content' keys"),
        ({"prompt": "hi"}, "row 2: cannot tell the row format"),
        ({"prompt": "hi", "completion": ""}, "row 2: empty completion"),
        ("{not json", "row 2: not valid JSON"),
        ([1, 2], "row 2: a row must be an object"),
    ],
)
def test_malformed_rows_name_file_and_row(tmp_path, row, message):
    with pytest.raises(DataError) as err:
        load(tmp_path, [GOOD, row, GOOD])
    assert str(tmp_path / "d.jsonl") in str(err.value) and message in str(err.value)
    assert "skip_bad_rows" in str(err.value)


def test_skip_bad_rows_counts_what_it_skipped(tmp_path):
    train, evals, report, _ = load(tmp_path, [GOOD, {"messages": []}, GOOD, "{x"] + [GOOD] * 17, skip_bad_rows=True)
    assert report.read == 21 and report.skipped_bad == 2
    assert len(train) + len(evals) == 19 and len(evals) == 1  # eval_fraction 0.05 of 19


def test_prompt_completion_strings_and_messages_become_conversations(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "completion": [{"role": "assistant", "content": "a"}],
            "answer": 4,
        },
    ]
    train, evals, _, _ = load(tmp_path, rows, eval=[{"path": "d.jsonl"}])
    by_first = {c["messages"][0]["content"]: c for c in evals}
    assert by_first["2+2?"]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert [m["role"] for m in by_first["s"]["messages"]] == ["system", "user", "assistant"]
    assert by_first["s"]["answer"] == "4"


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_other_local_formats(tmp_path, suffix):
    import pandas as pd

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    r = recipe_for(tmp_path, [{"path": path.name}], eval=[{"path": path.name}])
    train, evals, rep, _ = train_eval_rows(r.sft.data, r, seed=0)
    assert (
        len(train) == 10
        and rep.read == 10
        and {c["messages"][1]["content"] for c in train} == {f"a{i}" for i in range(10)}
    )


def test_mixture_weights_and_missing_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD] * 10)
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}] * 10)
    r = recipe_for(
        tmp_path, [{"path": "a.jsonl", "weight": 0.5}, {"path": "b.jsonl", "weight": 2.0}], eval=[{"path": "a.jsonl"}]
    )
    train, _, report, _ = train_eval_rows(r.sft.data, r, seed=0)
    assert len(train) == 25 and sum(c["messages"][0]["content"] == "p" for c in train) == 20
    r = recipe_for(tmp_path, [{"path": "missing.jsonl"}])
    with pytest.raises(DataError, match="missing.jsonl: data file not found"):
        train_eval_rows(r.sft.data, r, seed=0)


def test_overlong_rows_are_counted_never_cut(tokenizer):
    tpl = load_template("phi_instruct")
    long = {"messages": [{"role": "user", "content": "What is 1 plus 1? " * 20}, {"role": "assistant", "content": "2"}]}
    report = DataReport()
    ds = tokenize_conversations([GOOD, long, GOOD], tokenizer, tpl, 32, "drop", report, "train")
    assert len(ds) == 2 and report.dropped_overlong == 1 and report.used == 2
    assert "1 rows over max_length dropped" in report.summary("train")
    with pytest.raises(DataError, match="train: row 2: .* tokens > max_length 32"):
        tokenize_conversations([GOOD, long], tokenizer, tpl, 32, "error", DataReport(), "train")


def test_shipped_tiny_data_is_what_the_generator_writes(tmp_path):
    from finetune.tiny import write_data

    write_data(tmp_path)
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "pref_train.jsonl", "pref_eval.jsonl"):
        assert (tmp_path / name).read_text() == (ROOT / "data" / "tiny" / name).read_text()
    held = [json.loads(x) for x in (ROOT / "data/tiny/sft_eval.jsonl").read_text().splitlines()]
    train = (ROOT / "data/tiny/sft_train.jsonl").read_text()
    assert all(f'"{r["messages"][0]["content"]}"' not in train for r in held)  # held-out questions stay out


def test_hub_dataset_ids_pass_config_and_split(tmp_path, monkeypatch):
    """No hub here: check a hub id reaches datasets.load_dataset with its config and split."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([GOOD] * 4)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    r = recipe_for(
        tmp_path,
        [{"path": "HuggingFaceH4/ultrachat_200k", "config": "default", "split": "train_sft"}],
        eval=[{"path": "HuggingFaceH4/ultrachat_200k", "split": "test_sft"}],
    )
    train, evals, report, _ = train_eval_rows(r.sft.data, r, seed=0)
    assert calls == [
        ("HuggingFaceH4/ultrachat_200k", "default", "train_sft"),
        ("HuggingFaceH4/ultrachat_200k", None, "test_sft"),
    ]
    assert len(train) == 4 and report.read == 4


def test_held_out_split_happens_before_repeats(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    r = recipe_for(tmp_path, [{"path": "d.jsonl", "weight": 2.0}], eval_fraction=0.1)
    train, evals, _, _ = train_eval_rows(r.sft.data, r, seed=0)
    held = {c["messages"][0]["content"] for c in evals}
    assert len(evals) == 10 and len(train) == 180 and not held & {c["messages"][0]["content"] for c in train}


def test_unicode_line_separators_inside_a_row_do_not_split_it(tmp_path):
    row = {"prompt": "a\u2028b", "completion": "c\u0085d"}
    (tmp_path / "d.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n")
    r = recipe_for(tmp_path, [{"path": "d.jsonl"}], eval=[{"path": "d.jsonl"}])
    train, _, report, _ = train_eval_rows(r.sft.data, r, seed=0)
    assert report.read == 1 and train[0]["messages"][0]["content"] == "a\u2028b"
