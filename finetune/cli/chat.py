"""Talk to a trained model: an interactive terminal chat and a non-interactive batch generator.

    finetune chat MODEL_DIR_OR_RECIPE [key=value ...] [--system TEXT] [--max-new-tokens N] [--temperature T]
    finetune generate MODEL_DIR_OR_RECIPE [key=value ...] --prompts FILE --out FILE.jsonl [--max-new-tokens N]

MODEL_DIR is an exported folder (`finetune export`) or any model folder with a chat template; a
RECIPE means its export folder when complete, else the last finished stage's adapter chain merged
into the base in memory (the same chain `finetune export` would write). Prompts are rendered with
the chat template in the tokenizer and generation stops at the end-of-turn token(s) from the
generation config, exactly as plain transformers would serve the exported folder.

In the chat, each reply streams as it is generated; the conversation accumulates turn by turn;
`/reset` starts a new conversation and `/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.chat_template import ChatTemplate
from finetune.core.data import read_prompts
from finetune.core.evaluation import generate_answers
from finetune.core.serving import Loaded, load_for_chat
from finetune.errors import UserError


def reply_streamer(tokenizer):
    """transformers' TextStreamer (prints each finished word as generation goes), minus the whitespace a
    template puts between its generation prompt and the reply ("Output: 5" -> "5")."""
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            super().on_finalized_text(text, stream_end)

    return ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """One conversation: the messages so far; `send` adds a user turn and the model's reply."""

    loaded: Loaded
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> dict:
        """Tokens of the conversation so far plus the generation prompt, as the template renders them."""
        return self.loaded.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    @torch.no_grad()
    def send(self, text: str, stream: bool = False) -> str:
        tok, model = self.loaded.tokenizer, self.loaded.model
        self.messages.append({"role": "user", "content": text})
        inputs = {k: v.to(model.device) for k, v in self.prompt().items()}
        sampling = (
            dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
            if self.temperature > 0
            else dict(do_sample=False)
        )
        out = model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.loaded.stop_ids,
            pad_token_id=tok.pad_token_id,
            **sampling,
            streamer=reply_streamer(tok) if stream else None,
        )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        cut = next((i for i, t in enumerate(new) if t in self.loaded.stop_ids), len(new))
        reply = tok.decode(new[:cut], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def chat_loop(session: ChatSession, read=input, out=sys.stdout) -> None:
    """Read user turns until /exit or end of input; each reply streams to stdout as it is generated."""
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=out)
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            print("(new conversation)", file=out, flush=True)
            continue
        if line.startswith("/"):
            print("commands: /reset (new conversation), /exit", file=out, flush=True)
            continue
        print("assistant> ", end="", file=out, flush=True)
        session.send(line, stream=True)  # TextStreamer prints the reply and its newline


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"finetune {command}", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "target", help="exported model folder, or a recipe (its export, else its last stage merged in memory)"
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. output_dir=/tmp/run")
    p.add_argument("--max-new-tokens", type=int, default=256)
    if command == "chat":
        p.add_argument("--system", help="system prompt for every conversation")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    else:
        p.add_argument(
            "--prompts",
            required=True,
            help=".txt (one prompt per line) or jsonl/json/csv/parquet rows "
            "with 'prompt' (string or messages) or 'messages'",
        )
        p.add_argument("--out", required=True, help="output .jsonl: each input row with its 'response'")
        p.add_argument("--batch-size", type=int, default=16)
    return p


def generate_file(loaded: Loaded, prompts_path: str, out_path: str, max_new_tokens: int, batch_size: int) -> int:
    """Greedy replies to every prompt of a file, written as jsonl (input fields + prompt + response)."""
    rows = read_prompts(prompts_path)
    stop_token = loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids[0])
    template = ChatTemplate(name="embedded", source=loaded.tokenizer.chat_template, end_of_turn=stop_token)
    replies = generate_answers(
        loaded.model, loaded.tokenizer, template, [r["prompt"] for r in rows], max_new_tokens, batch_size
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(
        "".join(
            json.dumps({**r["example"], "prompt": r["prompt"], "response": reply}) + "\n"
            for r, reply in zip(rows, replies)
        )
    )
    tmp.replace(out)
    return len(rows)


def main(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_args(argv)
    try:
        loaded = load_for_chat(args.target, args.overrides)
        if command == "generate":
            n = generate_file(loaded, args.prompts, args.out, args.max_new_tokens, args.batch_size)
            print(f"finetune generate: {n} replies from {loaded.description} -> {args.out}", file=sys.stderr)
            return 0
        print(f"chatting with {loaded.description}\n/reset starts a new conversation, /exit quits", file=sys.stderr)
        chat_loop(ChatSession(loaded, args.system, args.max_new_tokens, args.temperature))
        return 0
    except UserError as e:
        print(f"finetune {command}: error:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else 2)
