"""Ollama: a Modelfile whose TEMPLATE renders the same prompt string as our chat template.

Ollama templates are Go `text/template` programs over `.Messages` (each with `.Role` and `.Content`;
https://github.com/ollama/ollama/blob/main/docs/template.md). Our templates are Jinja. Rather than
translate Jinja syntax, the template is *measured*: rendering one message of each role with a marker as
its content gives the text each role puts before and after its content, and rendering no messages gives
the generation prompt (`add_generation_prompt=True`) and the closing text (`False`). `template_parts`
then checks that this per-message model reproduces the Jinja template on every conversation in
`PROBES` (system prompts, several turns); a template that does something else (merges the system
prompt into the first user turn, numbers its turns, ...) is refused with a message instead of getting a
Modelfile that would prompt the model differently from training.

The Go template is then written from those parts with the constructs Ollama's own templates use: a
`range` over `.Messages`, `if eq .Role`, and the generation prompt when the last message is not the
assistant's. `render_go` renders it with Go's own text/template (the `py-go-template` package, which
links Go's library into a shared object) on the values Ollama passes (`ollama_values`), so the tests
compare our prompt with the prompt Ollama would build, byte for byte.

What the check covers: conversations of system / user / assistant messages that end with a user turn
(what a chat sends). Ollama also passes tool calls and images; our templates have no tool role.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.chat_template import render
from finetune.errors import UserError

MODELFILE = "Modelfile"
ROLES = ("system", "user", "assistant")
_MARK = "\u2063FINETUNE-CONTENT\u2063"  # invisible separator: appears in no template's own text

# Conversations the per-message model must reproduce exactly (each ends with a user turn, as a chat does).
PROBES = [
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [{"role": "system", "content": "Reply with the answer only."}, {"role": "user", "content": "What is 7 minus 4?"}],
    [
        {"role": "user", "content": "What is the opposite of hot?"},
        {"role": "assistant", "content": "cold"},
        {"role": "user", "content": "And of big?"},
    ],
    [
        {"role": "system", "content": "Be brief.\nVery brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": 'Another, with {{ braces }} and "quotes".'},
    ],
]


class TemplateNotPortable(UserError):
    """The chat template is not a per-message template, so no Ollama template can be derived from it."""


@dataclass(frozen=True)
class TemplateParts:
    """What a per-message chat template writes: around each role's content, after the last message when a
    reply is wanted (`generation`), and after it otherwise (`closing`)."""

    around: dict[str, tuple[str, str]]
    generation: str
    closing: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = "".join(self.around[m["role"]][0] + m["content"] + self.around[m["role"]][1] for m in messages)
        return text + (self.generation if add_generation_prompt else self.closing)


def template_parts(tokenizer) -> TemplateParts:
    """Measure the tokenizer's chat template (see the module docstring) and check the measurement on PROBES.

    transformers renders no empty conversation, so each role's text is measured from two conversations: one
    message of that role (text `one` = part + closing) and two of them (part + part + closing)."""
    around, closing = {}, None
    for role in ROLES:
        one = render(tokenizer, [{"role": role, "content": _MARK}], add_generation_prompt=False)
        two = render(tokenizer, [{"role": role, "content": _MARK}] * 2, add_generation_prompt=False)
        part = two[: len(two) - len(one)]
        if part.count(_MARK) != 1 or two != part + one or (closing is not None and one[len(part) :] != closing):
            raise TemplateNotPortable(
                f"the chat template does not write each {role} message on its own (measured: {one!r}, {two!r})"
            )
        closing = one[len(part) :]
        around[role] = tuple(part.split(_MARK))
    user = render(tokenizer, [{"role": "user", "content": _MARK}], add_generation_prompt=True)
    generation = user[len("".join(around["user"])) + len(_MARK) :]
    parts = TemplateParts(around, generation, closing)
    for messages in PROBES:
        ours = render(tokenizer, messages, add_generation_prompt=True)
        if parts.render(messages, True) != ours:
            raise TemplateNotPortable(
                "the chat template renders this conversation differently from its messages one by one: "
                f"{json.dumps(messages)} -> {ours!r}"
            )
    return parts


def _literal(text: str) -> str:
    """Text as it stands in a Go template: literal, except that `{{` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(parts: TemplateParts) -> str:
    """The Ollama TEMPLATE (Go text/template) for `parts`. `$gen` ends true unless the last message is the
    assistant's, as add_generation_prompt would be for a chat; no trim markers ({{-), so the text around each
    action is exactly the template's."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{_literal(before)}{{{{ .Content }}}}{_literal(after)}"
        for i, (role, (before, after)) in enumerate(parts.around.items())
    )
    return (
        f'{{{{ $gen := true }}}}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ $gen = ne .Role "assistant" }}}}'
        f"{{{{ end }}}}{{{{ if $gen }}}}{_literal(parts.generation)}{{{{ end }}}}"
    )


def ollama_values(messages: list[dict]) -> dict:
    """The values Ollama executes a `.Messages` template with (template.Execute in ollama/template/template.go):
    consecutive messages of one role merged with a blank line between them (its `collate`), every system
    message also joined into `.System`, and an empty `.Response`. Transcribed, as the renderer is Go's own."""
    system, collated = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(system), "Messages": collated, "Response": ""}


_RENDER = """
import json, pathlib, sys, tempfile
import go_template
job = json.load(sys.stdin)
with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "template"
    path.write_text(job["template"])
    out = [go_template.render(path, values).decode() for values in job["values"]]
json.dump(out, sys.stdout)
"""


def go_renderer_missing() -> str | None:
    """Why Go's text/template cannot be run here, or None."""
    import importlib.util

    if importlib.util.find_spec("go_template") is None:
        return "py-go-template (Go's text/template) is not installed: pip install 'finetune[gguf]' (Linux x86-64)"
    return None


def render_go(template: str, conversations: list[list[dict]]) -> list[str]:
    """Each conversation rendered by Go's text/template as Ollama would. In a child process: the library
    exits its process on a template error instead of raising."""
    job = {"template": template, "values": [ollama_values(c) for c in conversations]}
    done = subprocess.run(
        [sys.executable, "-c", _RENDER], input=json.dumps(job), capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"Go text/template failed on the Ollama template: {(done.stderr or done.stdout)[-2000:]}")
    return json.loads(done.stdout)


def check_go_template(template: str, tokenizer) -> int:
    """Render PROBES with Go's text/template and with our chat template; raise when any prompt differs.
    Returns the number of conversations compared."""
    theirs = render_go(template, PROBES)
    for messages, got in zip(PROBES, theirs):
        ours = render(tokenizer, messages, add_generation_prompt=True)
        if got != ours:
            raise TemplateNotPortable(
                f"the Ollama template renders {json.dumps(messages)} as {got!r}, our chat template as {ours!r}"
            )
    return len(PROBES)


def parameters(generation_config: dict, stops: list[str]) -> list[tuple[str, object]]:
    """Ollama PARAMETERs for the export's generation_config.json: its stop tokens, and its decoding settings,
    written out even where they are transformers' defaults because Ollama's defaults differ (it samples at
    temperature 0.8 with a repeat penalty; transformers decodes greedily with none)."""
    params: list[tuple[str, object]] = [("stop", s) for s in dict.fromkeys(stops)]
    if generation_config.get("do_sample"):
        params.append(("temperature", generation_config.get("temperature", 1.0)))
        params.append(("top_p", generation_config.get("top_p", 1.0)))
        params.append(("top_k", generation_config.get("top_k", 50) or 0))
    else:
        params.append(("temperature", 0))
    params.append(("repeat_penalty", generation_config.get("repetition_penalty", 1.0)))
    if generation_config.get("max_new_tokens"):
        params.append(("num_predict", generation_config["max_new_tokens"]))
    return params


def modelfile(gguf_name: str, template: str, params: list[tuple[str, object]], source: str) -> str:
    """The Modelfile text (https://github.com/ollama/ollama/blob/main/docs/modelfile.md). Ollama's parser keeps
    printable characters, spaces, tabs and newlines inside \"\"\"...\"\"\" and ends the string at the next \"\"\"."""
    bad = [c for c in template if not (c.isprintable() or c in "\n\t")]
    if '"""' in template or bad:
        raise TemplateNotPortable(
            f"the Ollama template contains {'a triple quote' if not bad else repr(bad[0])}, which a Modelfile "
            "cannot hold"
        )

    def value(v):
        return json.dumps(v) if isinstance(v, str) else str(v)

    lines = [
        f"# {source}",
        "# ollama create NAME -f Modelfile && ollama run NAME   (docs/deploy.md)",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER {k} {value(v)}" for k, v in params),
    ]
    return "\n".join(lines) + "\n"


def parse_template(text: str) -> str:
    """The TEMPLATE of a Modelfile we wrote (for checks: what Ollama's parser reads between the quotes)."""
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start : text.index('"""', start)]


def write_modelfile(folder: Path, gguf_name: str, tokenizer, stops: list[str], generation_config: dict) -> dict:
    """Derive the Ollama template from the tokenizer's chat template, check it (Go's renderer when installed,
    else the per-message model), and write `folder/Modelfile` atomically. Returns what was checked."""
    from finetune.core.outputs import write_text

    template = go_template(template_parts(tokenizer))
    missing = go_renderer_missing()
    checked = check_go_template(template, tokenizer) if missing is None else 0
    text = modelfile(gguf_name, template, parameters(generation_config, stops), "written by finetune export")
    write_text(folder / MODELFILE, text)
    return {
        "file": MODELFILE,
        "from": gguf_name,
        "template_checked_with": "go text/template" if checked else f"per-message model only ({missing})",
        "conversations_compared": checked or len(PROBES),
    }
