"""The Ollama Modelfile: its TEMPLATE, run by Go's own text/template on the values Ollama passes, renders the
same prompt strings as our chat templates (phi_instruct on the tiny tokenizer, phi3 on a Phi-3.5-shaped one)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

go = pytest.importorskip("go_template", reason="py-go-template (Go's text/template) is not installed here")


def phi3_tokenizer():
    from finetune.chat_template import load_template, prepare_tokenizer
    from tests.phi_models import build_tokenizer

    return prepare_tokenizer(build_tokenizer("phi3_5", ["hello world"]), load_template("phi3"))


def held_out_conversations() -> list[list[dict]]:
    """The tiny held-out questions (what export measures), alone, after a system prompt, and as a later turn."""
    rows = [json.loads(line) for line in (ROOT / "data/tiny/sft_eval.jsonl").read_text().splitlines()]
    questions = [r["messages"][0] for r in rows]
    system = {"role": "system", "content": "Reply with the answer only."}
    earlier = [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]
    return [[q] for q in questions] + [[system, q] for q in questions[:5]] + [[*earlier, q] for q in questions[:5]]


@pytest.fixture(params=["phi_instruct", "phi3"])
def chat_tokenizer(request, tokenizer):
    return tokenizer if request.param == "phi_instruct" else phi3_tokenizer()


def test_the_ollama_template_renders_our_prompts_byte_for_byte(chat_tokenizer):
    from finetune.chat_template import render
    from finetune.deploy import ollama

    template = ollama.go_template(ollama.template_parts(chat_tokenizer))
    held_out = held_out_conversations()
    conversations = held_out + [c for c in ollama.PROBES if c not in held_out]
    theirs = ollama.render_go(template, conversations)
    ours = [render(chat_tokenizer, c, add_generation_prompt=True) for c in conversations]
    assert theirs == ours
    assert len(set(ours)) == len(ours)  # the conversations differ, so the comparison can fail


def test_a_changed_template_fails_the_check(tokenizer):
    """Control: the check compares the prompt strings, so one character of difference is caught."""
    from finetune.deploy import ollama

    template = ollama.go_template(ollama.template_parts(tokenizer))
    with pytest.raises(ollama.TemplateNotPortable, match="renders"):
        ollama.check_go_template(template.replace("Instruct: ", "Instruct:"), tokenizer)


def test_a_template_that_is_not_per_message_is_refused(tokenizer):
    """A template that folds the system prompt into the first user turn has no per-message form: no Modelfile
    is written that would prompt the model differently from training."""
    from finetune.deploy import ollama

    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}{% elif m['role'] == 'user' %}"
        "Instruct: {% if loop.index0 == 1 %}(sys) {% endif %}{{ m['content'] }}\n{% else %}Output: {{ m['content'] }}"
        "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Output:{% endif %}"
    )
    with pytest.raises(ollama.TemplateNotPortable):
        ollama.template_parts(tokenizer)


def test_modelfile_holds_the_template_stops_and_greedy_decoding(tokenizer, tmp_path):
    from finetune.deploy import ollama

    info = ollama.write_modelfile(tmp_path, "tiny-q8_0.gguf", tokenizer, ["<|endoftext|>"], {"eos_token_id": 0})
    text = (tmp_path / "Modelfile").read_text()
    assert info["template_checked_with"] == "go text/template"
    assert "FROM ./tiny-q8_0.gguf" in text.splitlines()
    assert ollama.parse_template(text) == ollama.go_template(ollama.template_parts(tokenizer))
    assert 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER temperature 0" in text  # transformers decodes greedily; Ollama would sample at 0.8
    assert "PARAMETER repeat_penalty 1.0" in text
    sampled = dict(ollama.parameters({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}, []))
    assert sampled == {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repeat_penalty": 1.0}


def test_ollama_merges_consecutive_messages_of_one_role_as_its_collate_does():
    from finetune.deploy.ollama import ollama_values

    values = ollama_values(
        [
            {"role": "system", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    )
    assert values["System"] == "a"
    assert values["Messages"] == [{"Role": "system", "Content": "a"}, {"Role": "user", "Content": "b\n\nc"}]
