"""Chat templates: the one place that turns conversations into tokens and loss labels.

Templates are `.jinja` files in `finetune/templates/` (referenced by name) or any path. A template
may declare its end-of-turn token in a leading comment (`end_of_turn: <|end|>`); without one, the
tokenizer's eos token ends each assistant turn.

Why `phi_instruct` for Phi-2 / Phi-1.5: Phi-2's model card documents the QA format
"Instruct: <prompt>\\nOutput:", so the base already continues it sensibly; it needs no new tokens
(role tokens such as <|user|> would be untrained embeddings that LoRA cannot learn without also
training and shipping the embedding matrix); and its end-of-turn token is `<|endoftext|>`, which
Phi-2 already emits at the end of a document and which `generate()` stops on by default. The cost
is pad == eos (docs/failure_modes.md), which `tokenize_conversation` handles: labels are built from
the template here, never by masking pad ids, so the end-of-turn token of every assistant turn is a label.

Train / serve parity: labels start right after the prefix that `add_generation_prompt=True`
renders, and that prefix must tokenize to exactly the first tokens of the training example; if a
template breaks this (e.g. a generation prompt ending in a space that BPE merges with the answer),
`tokenize_conversation` raises instead of training on a format the server will never produce.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.readers import read_text

TEMPLATE_DIR = Path(__file__).parent / "templates"
IGNORE_INDEX = -100
_EOT_DECL = re.compile(r"end_of_turn:\s*(\S+)")


class TemplateError(UserError):
    """A template / tokenizer / conversation combination that cannot train correctly."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    end_of_turn: str | None  # None: the tokenizer's eos token

    def end_of_turn_token(self, tokenizer) -> str:
        return self.end_of_turn or tokenizer.eos_token


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def load_template(name_or_path: str) -> ChatTemplate:
    """A template by shipped name (`phi_instruct`, `phi3`) or by path to a .jinja file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATE_DIR / f"{name_or_path}.jinja"
    if not path.is_file():
        raise TemplateError(
            f"chat template {name_or_path!r} not found: use one of {available_templates()} or a path to a .jinja file"
        )
    source = read_text(path, TemplateError, "the template")  # a byte-order mark would be rendered into every prompt
    check_syntax(source, path)
    decl = _EOT_DECL.search(source.split("-#}", 1)[0]) if source.lstrip().startswith("{#") else None
    return ChatTemplate(name=path.stem, source=source, end_of_turn=decl.group(1) if decl else None)


def check_syntax(source: str, path: Path) -> None:
    """Compile the template as transformers will (its sandboxed Jinja environment), so a syntax error names
    the file and line now instead of surfacing as a Jinja traceback at the first conversation."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # another transformers: plain Jinja parses the same syntax (minus {% generation %})
        compile_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string
    try:
        compile_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template {path}: line {e.lineno}: Jinja syntax error: {e.message}; fix the template"
        ) from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template {path}: {type(e).__name__}: {e}; fix the template") from None


def special_tokens(tokenizer, end_of_turn: str | None = None) -> set[str]:
    """Every string the tokenizer reads as one special token (its special and added special tokens, and the
    template's end-of-turn token): text containing one would be read as that token, not as text."""
    found = set(tokenizer.all_special_tokens) | {end_of_turn or tokenizer.eos_token}
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return {t for t in found if t}


def find_special_token(text: str, tokenizer, end_of_turn: str | None = None) -> str | None:
    """The first special token spelt out in `text`, or None. The one check of training data (refused) and of
    prompts at inference (`finetune chat` / `generate` refuse them too): a user string that spells the end-of-turn
    token could end its turn and write the assistant's."""
    return next((t for t in sorted(special_tokens(tokenizer, end_of_turn), key=len, reverse=True) if t in text), None)


def prepare_tokenizer(tokenizer, template: ChatTemplate):
    """Install the template in the tokenizer (so it is saved with every output) and set padding.

    Phi tokenizers have no pad token; pad = eos is safe for training because labels never come from
    pad ids. (A sequence-classification reward model reads its score at the last non-pad token, so
    with pad = eos it scores the token before a closing eos, not the eos itself.)
    """
    tokenizer.chat_template = template.source
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eot = template.end_of_turn_token(tokenizer)
    ids = tokenizer.convert_tokens_to_ids([eot])
    if eot is None or ids[0] is None or ids[0] == tokenizer.unk_token_id and eot != tokenizer.unk_token:
        raise TemplateError(
            f"chat template {template.name!r} ends turns with {eot!r}, which this tokenizer does not have as one "
            f"token; pick the template of this model family (phi_instruct for Phi-2/Phi-1.5, phi3 for Phi-3.5)"
        )
    return tokenizer


def end_of_turn_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """Token ids generation must stop on: the end-of-turn token, and eos if different."""
    ids = [tokenizer.convert_tokens_to_ids(template.end_of_turn_token(tokenizer))]
    if tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


_longest_token: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def least_tokens(chars: int, tokenizer) -> int:
    """The fewest tokens a text of `chars` characters can tokenize to: no vocabulary entry covers more characters
    than its own spelling has (a byte-level BPE entry spells each byte as one character, a SentencePiece entry
    its characters), so a text needs at least chars / (the longest entry) tokens. A row far over a length limit
    is known to be over it without tokenizing it: tokenizing a text of hundreds of MB takes minutes and GBs, and
    the Rust tokenizer aborts the whole process when an allocation fails. (A tokenizer whose normalizer deletes
    characters could need fewer; the Phi tokenizers, byte-level BPE and SentencePiece, delete none.)"""
    if tokenizer not in _longest_token:
        _longest_token[tokenizer] = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
    return -(-chars // _longest_token[tokenizer])


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # e.g. raise_exception() in the template, or an undefined variable
        raise TemplateError(
            f"the chat template failed to render a conversation with roles {[m.get('role') for m in messages]}: "
            f"{type(e).__name__}: {e}; fix the template or the data"
        ) from None


def encode(tokenizer, text: str) -> list[int]:
    # The template writes every special token itself; adding BOS/EOS here would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens of the inference prompt: the conversation so far plus the generation prompt."""
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def tokenize_conversation(tokenizer, template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels for one conversation: only assistant turns are labels, each through its
    end-of-turn token inclusive; system and user turns and the generation prompts are IGNORE_INDEX."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    input_ids = encode(tokenizer, text)
    labels = [IGNORE_INDEX] * len(input_ids)
    eot = set(end_of_turn_ids(tokenizer, template)[:1])
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        prefix_ids = encode(tokenizer, prefix_text)
        if not text.startswith(prefix_text) or input_ids[: len(prefix_ids)] != prefix_ids:
            raise TemplateError(
                f"chat template {template.name!r}: the inference prompt for assistant turn {i} does not tokenize "
                "as the same prefix of the training example; training on it would not match serving. Make the "
                "generation prompt end at a token boundary (no trailing space)."
            )
        end = next((j for j in range(len(prefix_ids), len(input_ids)) if input_ids[j] in eot), None)
        if end is None:
            raise TemplateError(
                f"chat template {template.name!r}: assistant turn {i} is not closed by the end-of-turn token "
                f"{template.end_of_turn_token(tokenizer)!r}"
            )
        labels[len(prefix_ids) : end + 1] = input_ids[len(prefix_ids) : end + 1]
    return input_ids, labels


def tokenize_reply(tokenizer, template: ChatTemplate, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, reply_ids) for one reply to a prompt: the prompt exactly as inference renders it,
    the reply through its end-of-turn token (the sequences DPO and the reward model train on)."""
    ids, labels = tokenize_conversation(tokenizer, template, prompt + [{"role": "assistant", "content": reply}])
    end = max(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start : end + 1]
