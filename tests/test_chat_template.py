import pytest

from finetune.chat_template import (
    IGNORE_INDEX,
    TemplateError,
    load_template,
    prepare_tokenizer,
    tokenize_conversation,
    tokenize_prompt,
)

CONVERSATION = [
    {"role": "system", "content": "Reply with the answer only."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "What letter comes after c?"},
    {"role": "assistant", "content": "d"},
]


def labelled_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])


@pytest.fixture()
def phi3_tokenizer(tiny_recipe):
    """A separate tiny tokenizer plus Phi-3.5's role tokens, to exercise the phi3 template offline."""
    from finetune.core.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_recipe)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    return prepare_tokenizer(tokenizer, load_template("phi3"))


def test_phi_instruct_renders_roles_and_turns(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "System: Reply with the answer only.\nInstruct: What is 2 plus 3?\nOutput: 5<|endoftext|>\n"
        "Instruct: What letter comes after c?\nOutput: d<|endoftext|>\n"
    )
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True).endswith(
        "Instruct: What is 2 plus 3?\nOutput:"
    )


@pytest.mark.parametrize("template", ["phi_instruct", "phi3"])
def test_only_assistant_turns_are_labels_and_each_ends_with_its_end_of_turn(template, tokenizer, phi3_tokenizer):
    tok = tokenizer if template == "phi_instruct" else phi3_tokenizer
    tpl = load_template(template)
    ids, labels = tokenize_conversation(tok, tpl, CONVERSATION)
    eot = tok.convert_tokens_to_ids(tpl.end_of_turn_token(tok))
    labelled = [t for t, y in zip(ids, labels) if y != IGNORE_INDEX]
    # exactly the two replies, each through its end-of-turn token; nothing of system/user/prompts
    assert labelled.count(eot) == 2
    assert (
        tok.decode(labelled).replace(" ", "") == f"5{tok.convert_ids_to_tokens(eot)}d{tok.convert_ids_to_tokens(eot)}"
    )
    for word in ("What", "Reply", "Instruct", "user", "assistant"):
        assert word not in labelled_text(tok, ids, labels)


def test_eos_is_a_label_although_pad_equals_eos(tokenizer):
    """The pad == eos pitfall (trl#1623): masking labels by pad id would remove every end of turn."""
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ids, labels = tokenize_conversation(tokenizer, load_template("phi_instruct"), CONVERSATION)
    eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    assert len(eos_positions) == 2 and all(labels[i] == tokenizer.eos_token_id for i in eos_positions)
    pad_masked = [IGNORE_INDEX if t == tokenizer.pad_token_id else y for t, y in zip(ids, labels)]
    assert tokenizer.eos_token_id not in pad_masked  # what the naive collator would have trained on


@pytest.mark.parametrize("template", ["phi_instruct", "phi3"])
def test_inference_prefix_tokenizes_as_inside_training_example(template, tokenizer, phi3_tokenizer):
    tok = tokenizer if template == "phi_instruct" else phi3_tokenizer
    ids, _ = tokenize_conversation(tok, load_template(template), CONVERSATION)
    for i, m in enumerate(CONVERSATION):
        if m["role"] == "assistant":
            prompt = tokenize_prompt(tok, CONVERSATION[:i])
            assert ids[: len(prompt)] == prompt
            # and it is what a plain transformers user gets from apply_chat_template
            plain = tok.apply_chat_template(CONVERSATION[:i], add_generation_prompt=True, tokenize=True)
            plain = plain["input_ids"] if hasattr(plain, "keys") else plain
            assert list(plain) == prompt


def test_template_breaking_prefix_parity_is_refused(tokenizer, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text(load_template("phi_instruct").source.replace("{{ 'Output:' }}", "{{ 'Output: ' }}"))
    tpl = load_template(str(bad))
    prepare_tokenizer(tokenizer, tpl)
    with pytest.raises(TemplateError, match="does not tokenize as the same prefix"):
        tokenize_conversation(tokenizer, tpl, CONVERSATION)


def test_template_needing_tokens_the_tokenizer_lacks_is_refused(tokenizer):
    with pytest.raises(TemplateError, match=r"ends turns with '<\|end\|>'.*pick the template of this model family"):
        prepare_tokenizer(tokenizer, load_template("phi3"))


def test_unknown_template_and_unknown_role(tokenizer):
    with pytest.raises(TemplateError, match="use one of \\['phi3', 'phi_instruct'\\]"):
        load_template("chatml")
    with pytest.raises(Exception, match="unknown role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_template_travels_with_saved_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.apply_chat_template(CONVERSATION, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
