import pytest

from finetune.chat_template import IGNORE_INDEX, load_template, tokenize_conversation, tokenize_reply
from finetune.core.data import DataError, DataReport, to_preference, tokenize_preferences

U = {"role": "user", "content": "What is 2 plus 3?"}


def a(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6"},
        {"prompt": [U], "chosen": [a("5")], "rejected": [a("6")]},
        {"chosen": [U, a("5")], "rejected": [U, a("6")]},  # full conversations sharing a prefix
    ],
)
def test_preference_shapes_normalise_to_one_form(row):
    assert to_preference(row, "auto", "f: row 1") == {"prompt": [U], "chosen": [a("5")], "rejected": [a("6")]}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "5"}, "f: row 1: missing field 'rejected'"),
        ({"prompt": "q", "chosen": "", "rejected": "6"}, "f: row 1: empty chosen"),
        ({"prompt": "q", "chosen": [a("5"), U], "rejected": "6"}, "chosen must be one assistant reply"),
        ({"chosen": [a("5")], "rejected": [a("6")]}, "share no prompt"),
        ({"prompt": [U, a("x")], "chosen": "5", "rejected": "6"}, "prompt ends with an assistant turn"),
    ],
)
def test_bad_preference_rows_name_the_row(row, message):
    with pytest.raises(DataError, match=message):
        to_preference(row, "auto", "f: row 1")


def test_identical_pairs_are_reported_not_trained(tmp_path):
    from finetune.core.data import train_eval_rows
    from finetune.recipe import validate_recipe
    from tests.conftest import write_jsonl

    write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "q", "chosen": "x", "rejected": "x"}, {"prompt": "q", "chosen": "x", "rejected": "y"}],
    )
    r = validate_recipe(
        {
            "output_dir": "o",
            "model": {"name_or_path": "builtin:tiny-phi"},
            "dpo": {"data": {"train": [{"path": "p.jsonl"}], "eval": [{"path": "p.jsonl"}]}},
        },
        source=str(tmp_path / "r.yaml"),
    )
    train, _, report, _ = train_eval_rows(r.dpo.data, r, 0, to_preference)
    assert len(train) == 1 and report.skipped_useless == 1
    assert "1 rows with identical chosen and rejected skipped" in report.summary("train")


def test_reply_tokens_are_the_sft_labels_and_the_prompt_is_the_inference_prompt(tokenizer):
    tpl = load_template("phi_instruct")
    prompt_ids, reply_ids = tokenize_reply(tokenizer, tpl, [U], "5")
    ids, labels = tokenize_conversation(tokenizer, tpl, [U, a("5")])
    assert prompt_ids + reply_ids == [t for t in ids][: len(prompt_ids) + len(reply_ids)]
    assert reply_ids == [y for y in labels if y != IGNORE_INDEX] and reply_ids[-1] == tokenizer.eos_token_id
    assert prompt_ids == tokenizer.apply_chat_template([U], add_generation_prompt=True, tokenize=True)["input_ids"]
    long_pair = {"prompt": [U], "chosen": [a("5")], "rejected": [a("6" * 200)]}
    ds = tokenize_preferences(
        [long_pair, {"prompt": [U], "chosen": [a("5")], "rejected": [a("6")]}],
        tokenizer,
        tpl,
        64,
        "drop",
        report := DataReport(),
        "train",
    )
    assert len(ds) == 1 and report.dropped_overlong == 1
    with pytest.raises(DataError, match="every pair was dropped"):
        tokenize_preferences([long_pair], tokenizer, tpl, 64, "drop", DataReport(), "train")


def test_content_spelling_a_special_token_is_refused(tokenizer):
    from finetune.core.data import tokenize_conversations

    row = {"messages": [U, a("Use <|endoftext|> to end. 5")], "where": "f.jsonl: row 7"}
    with pytest.raises(DataError, match="f.jsonl: row 7: content contains the special token '<\\|endoftext\\|>'"):
        tokenize_conversations([row], tokenizer, load_template("phi_instruct"), 64, "drop", DataReport(), "train")
