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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.chat_template import ChatTemplate, find_special_token, least_tokens
from finetune.core.data import DataError, read_prompts
from finetune.core.evaluation import generate_answers, prompt_tokens
from finetune.core.fingerprints import sha256_file
from finetune.core.integrity import read_json
from finetune.core.outputs import write_json
from finetune.core.ownership import check_file_target, file_mark, remove_file
from finetune.core.progress import progress
from finetune.core.serving import Loaded, load_for_chat
from finetune.errors import UserError
from finetune.launch import INTERRUPTED


def check_text(text: str, tokenizer, stop_ids: list[int], where: str) -> None:
    """The rule training applies to data, applied to what a user sends: text that spells a special token
    (the end-of-turn token above all) is refused, since the model would read it as that token: a user
    string could end its own turn and write the assistant's (finetune.chat_template.find_special_token)."""
    found = find_special_token(text, tokenizer, tokenizer.convert_ids_to_tokens(stop_ids[0]))
    if found:
        raise DataError(
            f"{where}: contains the special token {found!r}, which the model would read as that token (it can end "
            "the turn and start another), not as text; refused, as in training data. Remove it or write it "
            "differently"
        )


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


DEFAULT_NEW_TOKENS = 256  # the reply budget when --max-new-tokens is not given (less where the context ends)


@dataclass
class ChatSession:
    """One conversation: the messages so far; `send` adds a user turn and the model's reply. With
    `max_new_tokens` None a reply may take DEFAULT_NEW_TOKENS tokens, or what the model's context leaves."""

    loaded: Loaded
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self, messages: list[dict] | None = None) -> dict:
        """Tokens of the conversation so far (or `messages`) plus the generation prompt, as the template renders
        them."""
        return self.loaded.tokenizer.apply_chat_template(
            self.messages if messages is None else messages,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )

    def prepare(self, text: str) -> tuple[dict, int]:
        """(the prompt with `text` as the next user turn, the reply's token budget), or a UserError saying why the
        message cannot be sent: it spells a special token, or it leaves the reply no room in the model's context
        (past it the model writes garbage). Nothing is added to the conversation here."""
        tok, context = self.loaded.tokenizer, self.loaded.context
        check_text(text, tok, self.loaded.stop_ids, "your message")
        messages = [*self.messages, {"role": "user", "content": text}]
        fix = "/reset starts a new conversation; or send a shorter message"
        if self.max_new_tokens is not None:
            fix += " or lower --max-new-tokens"
        if context is not None:
            chars = sum(len(m["content"]) for m in messages)
            least = least_tokens(chars, tok)
            if least >= context:
                raise DataError(
                    f"your message: the conversation would be {chars:,} characters, at least {least:,} tokens, more "
                    f"than the model's context of {context} positions (past it the model writes garbage). {fix}"
                )
        inputs = self.prompt(messages)
        length = inputs["input_ids"].shape[1]
        room = context - length if context is not None else DEFAULT_NEW_TOKENS
        budget = min(DEFAULT_NEW_TOKENS, room) if self.max_new_tokens is None else self.max_new_tokens
        if budget < 1 or budget > room:
            raise DataError(
                f"your message: the conversation would be {length} tokens, leaving {max(room, 0)} of the model's "
                f"{context} positions for a reply of {budget if budget >= 1 else 'at least 1'} tokens (past them the "
                f"model writes garbage). {fix}"
            )
        return inputs, budget

    @torch.no_grad()
    def send(self, text: str, stream: bool = False) -> str:
        tok, model = self.loaded.tokenizer, self.loaded.model
        inputs, budget = self.prepare(text)  # refused before it joins the conversation
        self.messages.append({"role": "user", "content": text})
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        sampling = (
            dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
            if self.temperature > 0
            else dict(do_sample=False)
        )
        out = model.generate(
            **inputs,
            max_new_tokens=budget,
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


def chat_loop(session: ChatSession, read=input, out=None) -> None:
    """Read user turns until /exit or end of input; each reply streams to stdout as it is generated."""
    out = out or sys.stdout  # the stream of the moment (a redirection after import included)
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
        try:
            session.prepare(line)
        except UserError as e:
            print(f"(not sent) {e}", file=out, flush=True)
            continue
        print("assistant> ", end="", file=out, flush=True)
        session.send(line, stream=True)  # TextStreamer prints the reply and its newline


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"finetune {command}", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "target", help="exported model folder, or a recipe (its export, else its last stage merged in memory)"
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. output_dir=/tmp/run")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"reply budget in tokens (default: {DEFAULT_NEW_TOKENS}, or what the model's context leaves)",
    )
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
        p.add_argument("--out", required=True, help="output .jsonl: each input row with its 'response' and 'stop'")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument(
            "--overwrite", action="store_true", help="replace an existing --out instead of continuing or refusing"
        )
    return p


def check_prompts(rows: list[dict], tokenizer, stop_ids: list[int]) -> None:
    """Every prompt of a file under the training rule (check_text); all offending rows are named at once."""
    end_of_turn = tokenizer.convert_ids_to_tokens(stop_ids[0])
    bad = []
    for i, row in enumerate(rows):
        found = next(
            (t for t in (find_special_token(m["content"], tokenizer, end_of_turn) for m in row["prompt"]) if t), None
        )
        if found:
            bad.append(f"{row.get('where', f'row {i + 1}')} ({found!r})")
    if bad:
        raise DataError(
            f"{len(bad)} prompt(s) spell a special token, which the model would read as that token (it can end the "
            "turn and start another), not as text; refused, as in training data: "
            f"{'; '.join(bad[:5])}{f'; and {len(bad) - 5} more' if len(bad) > 5 else ''}. Remove it from those rows"
        )


def _answered(out: Path, rows: list[dict], meta: dict, meta_path: Path, overwrite: bool) -> int:
    """How many prompts `out` already answers (a run that stopped midway continues after them), after
    checking that it is this run's file: same prompts file, model and generation budget. A last line cut
    short by a kill is removed."""
    if not out.exists():
        return 0
    if overwrite:  # only a file an earlier `finetune generate` wrote (its mark beside it), never the user's own
        remove_file(out, "Choose another --out, or move that file away yourself")
        return 0
    check_file_target(out, "Choose another --out, or move that file away yourself")  # finetune wrote it
    recorded = read_json(
        meta_path, "a damaged record of the run that wrote it; pass --overwrite to start the file over"
    )
    if recorded != meta:
        differs = ", ".join(f"{k} was {recorded.get(k)!r}" for k in meta if recorded.get(k) != meta[k])
        raise DataError(
            f"{out}: already exists and was written by another `finetune generate` ({differs}); pass --overwrite to "
            "replace it, or choose another --out"
        )
    data = out.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # whole lines only
    lines = keep.decode("utf-8").splitlines()
    for i, line in enumerate(lines):
        if i >= len(rows) or json.loads(line).get("prompt") != rows[i]["prompt"]:
            raise DataError(
                f"{out}: line {i + 1} does not answer prompt {i + 1} of the prompts file; pass --overwrite to "
                "replace the file, or choose another --out"
            )
    if len(keep) < len(data):
        with out.open("r+b") as fh:
            fh.truncate(len(keep))
    return len(lines)


def generate_file(
    loaded: Loaded,
    rows: list[dict],
    out_path: str,
    max_new_tokens: int,
    batch_size: int,
    prompts_path: str = "",
    overwrite: bool = False,
) -> int:
    """Greedy replies to every prompt of `rows` (read_prompts), written as jsonl: the input fields, the
    prompt, the `response` verbatim and `stop` (end_of_turn or max_new_tokens). Each batch is appended and
    flushed as soon as it is generated, so a run that stops keeps what it made; run again, it continues after
    the prompts already answered (and says so). Returns the number of replies made now."""
    stop_token = loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids[0])
    template = ChatTemplate(name="embedded", source=loaded.tokenizer.chat_template, end_of_turn=stop_token)
    out = Path(out_path)
    if prompts_path and out.exists() and out.resolve() == Path(prompts_path).resolve():
        raise DataError(f"{out}: --out is the prompts file itself; name another file for the answers")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = file_mark(out)  # what wrote it (prompts, model, budget): finetune's mark on the file
    meta = {
        "prompts": str(Path(prompts_path).resolve()) if prompts_path else None,
        "prompts_sha256": sha256_file(prompts_path) if prompts_path else None,
        "model": loaded.description,
        "max_new_tokens": max_new_tokens,
    }
    done = _answered(out, rows, meta, meta_path, overwrite)
    if done == len(rows):
        print(f"finetune generate: all {done} prompts are already answered in {out}; nothing to do", file=sys.stderr)
        return 0
    if done:
        print(
            f"finetune generate: {out} already answers {done} of {len(rows)} prompts (an earlier run stopped); "
            f"answering the remaining {len(rows) - done}",
            file=sys.stderr,
        )
    write_json(meta_path, meta)
    with (
        progress("generate", total=len(rows), unit="prompts", initial=done, announce=True) as bar,
        out.open("a", encoding="utf-8") as fh,
    ):
        for start in range(done, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            replies = generate_answers(
                loaded.model,
                loaded.tokenizer,
                template,
                [r["prompt"] for r in batch],
                max_new_tokens,
                batch_size,
                names=[r["where"] for r in batch],
                key="--max-new-tokens",
            )
            for r, reply in zip(batch, replies):
                answer = {**r["example"], "prompt": r["prompt"], "response": str(reply), "stop": reply.stop}
                fh.write(json.dumps(answer) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))
    return len(rows) - done


def generation_budget(rows: list[dict], tokenizer, context: int | None, asked: int | None) -> int:
    """The reply budget of `finetune generate`, decided before the model loads: --max-new-tokens when given
    (every prompt must leave it room in the model's context: refused otherwise, the rows named), else
    DEFAULT_NEW_TOKENS, or what the longest prompt leaves of the context when that is less (and said so)."""
    names, prompts = [r["where"] for r in rows], [r["prompt"] for r in rows]
    if asked is not None:
        prompt_tokens(prompts, tokenizer, asked, context, names, "--max-new-tokens")
        return asked
    ids = prompt_tokens(prompts, tokenizer, 1, context, names, "--max-new-tokens")
    longest = max(len(p) for p in ids)
    if context is None or context - longest >= DEFAULT_NEW_TOKENS:
        return DEFAULT_NEW_TOKENS
    print(
        f"finetune generate: replies of at most {context - longest} tokens: the model's context of {context} positions "
        f"less the longest prompt ({longest} tokens); --max-new-tokens sets it",
        file=sys.stderr,
    )
    return context - longest


def chat_checks(system: str | None, asked: int | None):
    """What `finetune chat` checks before the model loads: the --system prompt (special tokens; room for a reply
    in the model's context) and an explicit --max-new-tokens that the context could never hold."""

    def check(tokenizer, stop_ids, context):
        if system:
            check_text(system, tokenizer, stop_ids, "--system")
        if context is not None and asked is not None and asked >= context:
            raise DataError(
                f"--max-new-tokens {asked}: the model has {context} positions for the conversation and the reply "
                f"together (past them it writes garbage); give less, or leave it out ({DEFAULT_NEW_TOKENS} or what the "
                "context leaves)"
            )
        if system:
            conversation = [{"role": "system", "content": system}, {"role": "user", "content": "?"}]
            prompt_tokens([conversation], tokenizer, asked or 1, context, ["--system"], "--max-new-tokens")

    return check


def main(command: str, argv: list[str]) -> int:
    args = _parser(command).parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        print(f"finetune {command}: error:\n--max-new-tokens {args.max_new_tokens}: give at least 1", file=sys.stderr)
        return 2
    try:
        if command == "generate":
            rows = read_prompts(args.prompts)  # a bad file fails before any model loads
            budget = {}

            def before(tok, stop, context):
                check_prompts(rows, tok, stop)
                budget["tokens"] = generation_budget(rows, tok, context, args.max_new_tokens)

            loaded = load_for_chat(args.target, args.overrides, before)
            try:
                n = generate_file(
                    loaded, rows, args.out, budget["tokens"], args.batch_size, args.prompts, args.overwrite
                )
            except KeyboardInterrupt:
                print(
                    f"finetune generate: interrupted (Ctrl-C); the answers made so far are in {args.out}: rerun the "
                    "same command to answer the rest",
                    file=sys.stderr,
                )
                return INTERRUPTED
            print(f"finetune generate: {n} replies from {loaded.description} -> {args.out}", file=sys.stderr)
            return 0
        loaded = load_for_chat(args.target, args.overrides, chat_checks(args.system, args.max_new_tokens))
        print(f"chatting with {loaded.description}\n/reset starts a new conversation, /exit quits", file=sys.stderr)
        chat_loop(ChatSession(loaded, args.system, args.max_new_tokens, args.temperature))
        return 0
    except UserError as e:
        print(f"finetune {command}: error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finetune {command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else 2)
