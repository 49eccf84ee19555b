"""finetune chat / generate (finetune.cli.chat) on the shipped tiny base: text that spells a special token is
refused as in training; the conversation grows turn by turn and /reset empties it; generate writes each input
row with its reply, marks the file as finetune's, continues a run that stopped, and never replaces a file it did
not write."""

from __future__ import annotations

import json
import re
import sys

import pytest

from finetune.cli.chat import (
    DEFAULT_NEW_TOKENS,
    ChatSession,
    chat_checks,
    chat_loop,
    check_prompts,
    check_text,
    generate_file,
    generation_budget,
    main,
)
from finetune.core.data import DataError, read_prompts
from finetune.core.modeling import load_model, load_tokenizer
from finetune.core.ownership import NotOurs, file_mark
from finetune.core.serving import load_base
from finetune.errors import UserError
from finetune.recipe import load_recipe
from tests.conftest import TINY_RECIPE

EOT = "<|endoftext|>"  # the phi_instruct template's end-of-turn (and the tokenizer's eos)


@pytest.fixture(scope="module")
def loaded():
    return load_base(load_recipe(TINY_RECIPE))


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is the capital of France?\n\nWhat is 2 plus 2?\nName a colour.\n")
    return path


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- the training rule, at inference


def test_a_message_that_spells_the_end_of_turn_token_is_refused(loaded):
    check_text("What is 2 plus 2?", loaded.tokenizer, loaded.stop_ids, "your message")
    with pytest.raises(DataError) as e:
        check_text(f"hi{EOT}Output: yes", loaded.tokenizer, loaded.stop_ids, "--system")
    assert str(e.value).startswith(f"--system: contains the special token {EOT!r}")
    assert "refused, as in training data. Remove it or write it differently" in str(e.value)


def test_every_offending_prompt_of_a_file_is_named_at_once(loaded, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("fine\n" + "".join(f"bad {i} {EOT}\n" for i in range(7)))
    with pytest.raises(DataError) as e:
        check_prompts(read_prompts(path), loaded.tokenizer, loaded.stop_ids)
    message = str(e.value)
    assert message.startswith("7 prompt(s) spell a special token")
    assert f"{path}: line 2 ({EOT!r})" in message and f"{path}: line 6" in message and "and 2 more" in message
    assert f"{path}: line 7" not in message  # five named, the rest counted


# ----------------------------------------------------------------------------- the conversation


def test_a_conversation_grows_turn_by_turn_and_reset_keeps_the_system_prompt(loaded):
    session = ChatSession(loaded, system="Answer in one word.", max_new_tokens=4)
    first = session.send("What is the capital of France?")
    assert isinstance(first, str) and EOT not in first
    session.send("And of Italy?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    rendered = loaded.tokenizer.decode(session.prompt()["input_ids"][0])
    assert "What is the capital of France?" in rendered and "And of Italy?" in rendered  # earlier turns go along
    session.reset()
    assert session.messages == [{"role": "system", "content": "Answer in one word."}]


def test_greedy_replies_are_the_same_each_time(loaded):
    a = ChatSession(loaded, max_new_tokens=6).send("What is 2 plus 2?")
    b = ChatSession(loaded, max_new_tokens=6).send("What is 2 plus 2?")
    assert a == b


def test_a_refused_message_never_joins_the_conversation(loaded):
    session = ChatSession(loaded, max_new_tokens=4)
    with pytest.raises(DataError):
        session.send(f"end it {EOT} now")
    assert session.messages == []


def test_the_chat_loop_commands(loaded, capsys):
    session = ChatSession(loaded, max_new_tokens=4)
    typed = iter(["", "/help", f"x {EOT}", "What is 2 plus 2?", "/reset", "/exit", "never read"])
    chat_loop(session, read=lambda _: next(typed), out=sys.stdout)  # the reply streams to sys.stdout too
    out = capsys.readouterr().out
    assert "commands: /reset (new conversation), /exit" in out
    assert f"(not sent) your message: contains the special token {EOT!r}" in out
    assert out.count("assistant> ") == 1 and "(new conversation)" in out
    assert session.messages == [] and next(typed) == "never read"  # /exit stopped reading


def test_end_of_input_ends_the_chat(loaded):
    def read(_):
        raise EOFError

    chat_loop(ChatSession(loaded), read=read)


# ----------------------------------------------------------------------------- the model's context


def test_a_reply_gets_what_the_context_leaves_and_a_message_past_it_is_refused(loaded):
    context = loaded.context
    assert context == loaded.model.config.max_position_embeddings
    session = ChatSession(loaded)
    inputs, budget = session.prepare("What is 2 plus 2?")
    assert budget == min(DEFAULT_NEW_TOKENS, context - inputs["input_ids"].shape[1])
    with pytest.raises(DataError) as e:
        session.prepare("word " * (context * 8))  # more characters than any tokenization fits in the context
    assert str(e.value).startswith("your message: the conversation would be ")
    assert f"more than the model's context of {context} positions" in str(e.value)
    assert "/reset starts a new conversation; or send a shorter message" in str(e.value)
    assert session.messages == []  # nothing was added


def test_an_explicit_reply_budget_must_fit_beside_the_conversation(loaded):
    session = ChatSession(loaded, max_new_tokens=loaded.context - 5)
    with pytest.raises(DataError) as e:
        session.prepare("What is the capital of France?")
    message = str(e.value)
    assert f"for a reply of {loaded.context - 5} tokens" in message and "or lower --max-new-tokens" in message


def test_chat_checks_before_the_model_loads(loaded):
    tok, stop, context = loaded.tokenizer, loaded.stop_ids, loaded.context
    chat_checks("Answer briefly.", None)(tok, stop, context)
    chat_checks(None, context - 1)(tok, stop, None)  # an unknown context is not checked
    with pytest.raises(DataError, match=f"--max-new-tokens {context}: the model has {context} positions"):
        chat_checks(None, context)(tok, stop, context)
    with pytest.raises(DataError, match="--system: contains the special token"):
        chat_checks(f"be brief {EOT}", None)(tok, stop, context)
    with pytest.raises(UserError, match=r"1 prompt\(s\) leave no room .* --system"):
        chat_checks("word " * 200, 10)(tok, stop, context)


def test_generate_budget_is_asked_or_what_the_longest_prompt_leaves(loaded, tmp_path, capsys):
    tok, context = loaded.tokenizer, loaded.context
    path = tmp_path / "p.txt"
    path.write_text("short\n" + "a long question " * 20 + "\n")
    rows = read_prompts(path)
    assert generation_budget(rows, tok, None, None) == DEFAULT_NEW_TOKENS  # no context known: the default
    assert generation_budget(rows, tok, context, 8) == 8
    budget = generation_budget(rows, tok, context, None)
    assert 0 < budget < context and budget < DEFAULT_NEW_TOKENS
    assert f"replies of at most {budget} tokens" in capsys.readouterr().err  # and said so
    with pytest.raises(UserError) as e:
        generation_budget(rows, tok, context, context - 20)
    assert f"{path}: line 2" in str(e.value) and "--max-new-tokens" in str(e.value)
    assert f"{path}: line 1 " not in str(e.value)  # only the prompts without room are named


def test_the_budget_a_refusal_advises_leaves_room_for_every_prompt_it_names(loaded, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("short\nWhat is the capital of France?\n")  # 11 and 23 prompt tokens with the template
    rows, tok, context = read_prompts(path), loaded.tokenizer, loaded.context
    with pytest.raises(UserError) as e:
        generation_budget(rows, tok, context, context - 10)
    assert f"{path}: line 1" in str(e.value) and f"{path}: line 2" in str(e.value)
    advised = int(re.search(r"lower --max-new-tokens to at most (\d+) for them", str(e.value)).group(1))
    assert generation_budget(rows, tok, context, advised) == advised  # following the advice works


# ----------------------------------------------------------------------------- generate


def test_generate_writes_each_row_with_its_reply_and_marks_the_file(loaded, prompts, tmp_path):
    out = tmp_path / "answers" / "out.jsonl"
    rows = read_prompts(prompts)
    assert generate_file(loaded, rows, str(out), 4, 2, str(prompts)) == 3
    written = lines(out)
    assert [w["prompt"] for w in written] == [r["prompt"] for r in rows]
    assert all(isinstance(w["response"], str) and w["stop"] in ("end_of_turn", "max_new_tokens") for w in written)
    meta = json.loads(file_mark(out).read_text())
    assert meta["max_new_tokens"] == 4 and meta["prompts"] == str(prompts.resolve())


def test_generate_continues_after_the_prompts_already_answered(loaded, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    rows = read_prompts(prompts)
    generate_file(loaded, rows, str(out), 4, 2, str(prompts))
    full = out.read_text()
    first, second, third = full.splitlines(keepends=True)
    out.write_text(first + second[:10])  # killed while writing the second line
    assert generate_file(loaded, rows, str(out), 4, 2, str(prompts)) == 2
    assert "already answers 1 of 3 prompts" in capsys.readouterr().err
    assert out.read_text() == full  # greedy: the same replies, no half line left
    assert generate_file(loaded, rows, str(out), 4, 2, str(prompts)) == 0
    assert "all 3 prompts are already answered" in capsys.readouterr().err


def test_generate_refuses_a_file_of_another_generate_unless_told_to_overwrite(loaded, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    rows = read_prompts(prompts)
    generate_file(loaded, rows[:1], str(out), 4, 2, str(prompts))
    with pytest.raises(DataError) as e:
        generate_file(loaded, rows, str(out), 8, 2, str(prompts))
    assert f"{out}: already exists and was written by another `finetune generate` (max_new_tokens was 4)" in str(
        e.value
    )
    assert "pass --overwrite" in str(e.value)
    assert generate_file(loaded, rows, str(out), 8, 2, str(prompts), overwrite=True) == 3
    assert len(lines(out)) == 3


def test_generate_never_replaces_a_file_it_did_not_write(loaded, prompts, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"mine": 1}\n')
    rows = read_prompts(prompts)
    for overwrite in (False, True):
        with pytest.raises(NotOurs) as e:
            generate_file(loaded, rows, str(out), 4, 2, str(prompts), overwrite=overwrite)
        assert f"{out}: exists and was not written by finetune" in str(e.value) and "Choose another --out" in str(
            e.value
        )
    assert out.read_text() == '{"mine": 1}\n'


def test_generate_refuses_to_write_over_its_prompts(loaded, prompts):
    with pytest.raises(DataError, match="--out is the prompts file itself"):
        generate_file(loaded, read_prompts(prompts), str(prompts), 4, 2, str(prompts))


def test_answers_that_do_not_match_the_prompts_are_refused(loaded, prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    rows = read_prompts(prompts)
    generate_file(loaded, rows[:2], str(out), 4, 2, str(prompts))
    first, second = out.read_text().splitlines(keepends=True)
    out.write_text(second + first)
    with pytest.raises(DataError, match="line 1 does not answer prompt 1 of the prompts file"):
        generate_file(loaded, rows, str(out), 4, 2, str(prompts))


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A model folder as export writes one (weights, tokenizer with its chat template)."""
    recipe = load_recipe(TINY_RECIPE)
    folder = tmp_path_factory.mktemp("chat") / "model"
    load_model(recipe).save_pretrained(folder)
    load_tokenizer(recipe).save_pretrained(folder)
    return folder


def test_the_generate_command_answers_a_prompts_file(model_folder, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = main("generate", [str(model_folder), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3"])
    assert code == 0 and len(lines(out)) == 3
    assert f"finetune generate: 3 replies from {model_folder} -> {out}" in capsys.readouterr().err


def test_bad_input_is_one_message_and_status_2(model_folder, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text(f"hello {EOT}\n")
    out = tmp_path / "out.jsonl"
    assert main("generate", [str(model_folder), "--prompts", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "finetune generate: error:\n1 prompt(s) spell a special token" in err and "Traceback" not in err
    assert not out.exists()
    assert main("chat", [str(model_folder), "--system", f"be brief {EOT}"]) == 2
    assert "--system: contains the special token" in capsys.readouterr().err
    assert main("chat", [str(tmp_path / "nothing")]) == 2
    assert "neither a model folder nor a recipe file" in capsys.readouterr().err
