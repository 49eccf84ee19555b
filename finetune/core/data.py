"""One data loader for every stage: read, validate, mix, split and tokenize.

Sources are local files (jsonl, json, parquet, csv; relative paths are relative to the recipe) or
hub dataset ids with config/split. Rows are conversations (`messages` of role/content) or
prompt/completion pairs (strings or message lists). A malformed row is an error naming the file
and row, unless `skip_bad_rows` is set, and then it is counted and reported. Rows longer than
max_length are counted and reported (dropped, or an error with `on_overlong: error`), never cut.
"""

from __future__ import annotations

import contextlib
import csv
import decimal
import io
import json
import logging
import math
import numbers
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.chat_template import (
    ChatTemplate,
    find_special_token,
    least_tokens,
    tokenize_conversation,
    tokenize_prompt,
    tokenize_reply,
)
from finetune.errors import UserError
from finetune.readers import BOM, decode, find_duplicate, parse_json
from finetune.recipe import DataSection, DataSource, Recipe

from .batching import PackedRowsCollator, pack_rows  # noqa: F401  (their home was here; the old import path stays)
from .progress import progress, track

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError):
    """Bad input data; the message names the source, the row and the fix."""


@dataclass
class DataReport:
    """What happened to the rows, so nothing is dropped silently."""

    read: int = 0
    skipped_bad: int = 0
    skipped_useless: int = 0
    dropped_overlong: int = 0
    repeated_prompts: int = 0
    used: int = 0
    left_out: int = 0  # held-out rows beyond data.max_eval_rows
    unscored: int = 0  # rows used whose `answer` is null, NaN or empty (not scored for correctness)
    # every row not used, named: {"source", "row", "kind", "reason"}; the stage writes them to dropped_rows.jsonl
    drops: list[dict] = field(default_factory=list)

    @property
    def examples(self) -> list[str]:
        """The first few problems, for the log."""
        return [f"{d['source']}: row {d['row']}: {d['reason']}" for d in self.drops[:5]]

    def drop(self, where: str, reason: str, kind: str) -> None:
        """Record a row that is not used: `where` is "<source>: row <n>" as rows carry it."""
        source, _, row = where.rpartition(": row ")
        self.drops.append(
            {"source": source or where, "row": int(row) if row.isdigit() else row, "kind": kind, "reason": reason}
        )

    def named(self, kind: str, count: int = 3) -> str:
        """The first `count` rows of a kind, for a log line: "d.jsonl row 5 (reason); ..."."""
        rows = [d for d in self.drops if d["kind"] == kind]
        shown = "; ".join(f"{d['source']} row {d['row']} ({d['reason']})" for d in rows[:count])
        return (
            shown
            + (f"; and {len(rows) - count} more" if len(rows) > count else "")
            + (" (all in dropped_rows.jsonl of the stage output)" if rows else "")
        )

    def overlong(self, where: str, tokens: int | str, key: str, limit: int, on_overlong: str = "drop") -> None:
        """A row longer than `key` (= `limit` tokens; `tokens` its count, or how it is known to be over): an error
        naming it (`data.on_overlong: error`), or counted, named and dropped, never truncated."""
        size = f"{tokens} tokens" if isinstance(tokens, int) else tokens
        if on_overlong == "error":
            raise DataError(f"{where}: {size} > {key} {limit}; raise {key} or set data.on_overlong: drop")
        self.dropped_overlong += 1
        self.drop(where, f"{size} > {key} {limit}", "overlong")

    def close_overlong(self, name: str, used: int, what: str, key: str, limit: int) -> None:
        """After tokenizing: `used` rows kept; none kept is an error, over-long ones are logged by row."""
        self.used = used
        if not used:
            raise DataError(f"{name}: every {what} was dropped (longer than {key} {limit}); raise {key}")
        if self.dropped_overlong:
            log.warning(
                "%s: %d %ss longer than %s=%d were dropped (not truncated): %s",
                name,
                self.dropped_overlong,
                what,
                key,
                limit,
                self.named("overlong"),
            )

    def summary(self, name: str) -> str:
        text = f"{name}: {self.read} rows read, {self.used} used"
        if self.skipped_bad:
            text += f", {self.skipped_bad} malformed rows skipped"
        if self.skipped_useless:
            text += f", {self.skipped_useless} rows with identical chosen and rejected skipped"
        if self.dropped_overlong:
            text += f", {self.dropped_overlong} rows over max_length dropped"
        if self.repeated_prompts:
            text += f", {self.repeated_prompts} repeated prompts kept once"
        if self.left_out:
            text += f", {self.left_out} beyond max_eval_rows left out"
        if self.unscored:
            text += f", {self.unscored} with an unusable answer (not scored)"
        return text


# ---------------------------------------------------------------- reading


def _read_local(path: Path) -> list:
    """Raw rows of a local file; row numbers are 1-based lines (jsonl) or positions. Read under
    finetune.readers' rules (a byte-order mark accepted, a key given twice refused at any depth)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in _text_lines(path):
            if isinstance(line, DataError):  # not UTF-8: a bad row like one that is not JSON
                rows.append((n, line))
                continue
            if not line.strip():
                continue
            try:
                rows.append((n, parse_json(line)))
            except json.JSONDecodeError as e:
                rows.append((n, DataError(f"{path}: row {n}: not valid JSON ({e.msg}); fix the line or remove it")))
            except ValueError as e:
                rows.append((n, DataError(f"{path}: row {n}: {e}")))
        return rows
    if suffix == ".json":
        text = _utf8_text(path)
        try:
            data = parse_json(text, duplicates="mark")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno} ({e.msg}); fix it, or use .jsonl") from None
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows; for one row per line use .jsonl")
        rows = []
        for n, row in enumerate(data, 1):  # a row with a key given twice is a bad row, as in a jsonl file
            twice = find_duplicate(row)
            rows.append((n, DataError(f"{path}: row {n}: {twice}") if twice else row))
        return rows
    return _read_table(path, suffix)


def _text_lines(path: Path) -> list[tuple[int, str | DataError]]:
    """(line number, text) of each line; a line that is not UTF-8 is a DataError naming it (a bad row, so
    skip_bad_rows can skip it). A byte-order mark before the first line is not part of it. Split on "\n"
    only: str.splitlines would also break rows at U+2028 / U+0085 inside strings."""
    out = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            out.append((n, raw.decode("utf-8").removeprefix(BOM) if n == 1 else raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            problem = f"{path}: row {n}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8"
            out.append((n, DataError(problem)))
    return out


def _utf8_text(path: Path) -> str:
    """The whole file as text (a byte-order mark removed); invalid UTF-8 is a DataError naming the line."""
    return decode(path.read_bytes(), str(path), DataError)


@contextlib.contextmanager
def _quiet(logger: str):
    """Errors of `logger` (and its children) not logged for the block."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        target.setLevel(level)


def _csv_columns(path: Path) -> list[str]:
    """The header of a csv file; a column name given twice is refused (pandas would rename the second
    `prompt.1`, and the first would be used without a word)."""
    header = next(csv.reader(io.StringIO(_utf8_text(path))), [])
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise DataError(f"{path}: the header names the column {twice[0]!r} twice; rename one of them")
    return header


def _parquet_columns(path: Path) -> None:
    """A parquet file may name a column twice (pyarrow writes it); refuse it with the column named."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - not parquet at all: load_dataset below says so in its words
        return
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise DataError(f"{path}: the column {twice[0]!r} is there twice; write the file again with one of them")


def _read_table(path: Path, suffix: str) -> list:
    """Rows of a csv / parquet file (read by datasets); a file it cannot parse is a DataError naming the file
    and, where the parser says it, the line, instead of datasets' "An error occurred while generating the
    dataset" traceback. Every csv cell is read as the text it holds: no column is guessed to be numbers
    (which turns "007" into 7, and a column of answers with one empty cell into floats, 42 -> 42.0) and no
    text such as "NA" or "null" is taken for a missing value."""
    from datasets import Features, Value, load_dataset

    options = {}
    if suffix == ".parquet":
        _parquet_columns(path)
    if suffix == ".csv":
        columns = _csv_columns(path)
        options = dict(features=Features({c: Value("string") for c in columns}), keep_default_na=False, na_filter=False)
    try:
        with _quiet(f"datasets.packaged_modules.{LOCAL_FORMATS[suffix]}"):  # it logs the error we report below
            ds = load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train", **options)
    except Exception as e:  # datasets wraps the parser's error (pandas ParserError, pyarrow ArrowInvalid)
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, OSError) and not isinstance(cause, UnicodeError):
            raise  # the machine's problem (disk, permissions), not the file's
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        hint = (
            "quote fields that contain commas, quotes or newlines, and give every line as many fields as the header"
            if suffix == ".csv"
            else "write it again (e.g. pandas DataFrame.to_parquet) or use jsonl"
        )
        raise DataError(f"{path}: not a readable {suffix[1:]} file ({detail}); {hint}") from None
    return list(enumerate(ds, 1))


def local_source(source: DataSource, recipe: Recipe) -> Path | None:
    """The local file a source names, or None for a hub dataset id. A path that looks local (./, /, ~,
    or a data file suffix) but does not exist is an error rather than a hub lookup."""
    local = Path(recipe.resolve_path(source.path))
    if local.exists():
        return local
    if source.path.startswith((".", "/", "~")) or Path(source.path).suffix.lower() in LOCAL_FORMATS:
        raise DataError(f"{local}: data file not found (relative paths are relative to the recipe {recipe.source})")
    return None


def read_source(source: DataSource, recipe: Recipe) -> tuple[str, list]:
    """(display name, [(row number, raw row)]) for a local file or a hub dataset."""
    local = local_source(source, recipe)
    if local is not None and local.is_dir():
        return read_dataset_folder(local, source)
    if local is not None:
        if local.suffix.lower() not in LOCAL_FORMATS:
            raise DataError(f"{local}: unsupported file type; use one of {sorted(LOCAL_FORMATS)}")
        return str(local), _read_local(local)
    from datasets import load_dataset

    with progress(f"loading dataset {source.path}[{source.split}]", announce=True):  # a download can be long
        ds = load_dataset(source.path, source.config, split=source.split)
    return f"{source.path}[{source.split}]", list(enumerate(ds, 1))


def read_dataset_folder(folder: Path, source: DataSource) -> tuple[str, list]:
    """A local copy of a hub dataset repository (`git clone https://huggingface.co/datasets/...`, or
    the same layout written by hand): its README's `configs:` name the splits, so `split: train_sft`
    means what it means on the hub. The same `datasets.load_dataset` call a hub id goes through."""
    from datasets import load_dataset

    try:
        ds = load_dataset(str(folder), source.config, split=source.split)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(
            f"{folder}: cannot read split {source.split!r} of this dataset folder ({str(e).splitlines()[0][:200]}); "
            "name a split its README's configs (or file names) define"
        ) from None
    return f"{folder}[{source.split}]", list(enumerate(ds, 1))


# ---------------------------------------------------------------- validation


def as_text(value) -> str | None:
    """The text of a value where text is expected: a string as it is; a number or boolean as it is written (a
    whole float without its ".0": a parquet or jsonl column of integers with one missing value holds floats,
    42 -> 42.0); None for anything else (null, NaN, a list, an object). One rule for every text field of every
    file type: prompt, completion, chosen, rejected, content, answer, ShareGPT's value, Alpaca's fields."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # a numpy scalar
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, (numbers.Real, decimal.Decimal)):
        number = float(value)
        if not math.isfinite(number):
            return None
        return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
    return None


def _missing(value) -> bool:
    """An empty cell: null, or NaN (how a number column holds one)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _kind(value) -> str:
    """How a value that is not text reads in a message."""
    if value is None:
        return "null (an empty cell)"
    if _missing(value):
        return "NaN (an empty cell of a number column)"
    return f"a {type(value).__name__}"


def _text(value, where: str, what: str) -> str:
    """`value` as non-empty text (as_text), or a DataError naming the field."""
    text = "" if _missing(value) else as_text(value)
    if text is None:
        raise DataError(f"{where}: {what} must be text, got {_kind(value)}")
    if not text.strip():
        raise DataError(f"{where}: empty {what}; fill it in or remove the row")
    return text


def answer_of(row: dict) -> tuple[str | None, str | None]:
    """(the row's reference `answer` as text, or None; why a given answer cannot be used, or None). Answers are
    compared by value (finetune.core.evaluation.same_answer), so 42, 42.0 and "42" are one answer; an answer
    that is null, NaN or empty is unusable: the row is trained on but not scored, and counted."""
    if not isinstance(row, dict) or "answer" not in row:
        return None, None
    value = row["answer"]
    text = as_text(value)
    if text is None or not text.strip():
        return None, f"its answer is {'empty' if text is not None else _kind(value)}: not scored"
    return text.strip(), None


UNSCORED = "_unscored"  # a converted row's note that its answer is unusable (load_rows counts and removes it)


def _with_answer(out: dict, row: dict) -> dict:
    answer, problem = answer_of(row)
    if answer is not None:
        out["answer"] = answer
    elif problem:
        out[UNSCORED] = problem
    return out


def _messages(value, where: str, what: str) -> list[dict]:
    if isinstance(value, str):
        raise DataError(f"{where}: {what} must be a list of {{role, content}} messages here, got a string")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {what} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {what}[{i}] needs 'role' and 'content' keys, got {m!r}"[:300])
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"{where}: {what}[{i}]: unknown role {role!r}; use one of {list(ROLES)}")
        content = "" if _missing(m["content"]) else as_text(m["content"])
        if content is None:
            raise DataError(f"{where}: {what}[{i}]: content must be text, got {_kind(m['content'])}")
        if not content.strip():
            raise DataError(f"{where}: {what}[{i}]: empty {role} content; fill it in or remove the row")
        out.append({"role": role, "content": content})
    return out


def _as_turns(value, role: str, where: str, what: str) -> list[dict]:
    """A prompt / completion given as text (a number is its text) or as messages."""
    if isinstance(value, list):
        return _messages(value, where, what)
    if isinstance(value, dict):
        raise DataError(f"{where}: {what} must be text or a list of {{role, content}} messages, got an object")
    return [{"role": role, "content": _text(value, where, what)}]


# ---------------------------------------------------------------- source formats
# Rows as public data sets ship them, turned into the shapes above without any edit by the user. Each
# converter takes one raw row and returns a row in a canonical shape (messages, prompt/completion or
# chosen/rejected conversations), keeping the row's other fields (ids, scores, an `answer`).

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def _is_hh_transcript(value) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def source_format(row: dict) -> str | None:
    """The public shape a raw row has (sharegpt, alpaca, hh), or None for rows already in a canonical
    shape (messages, prompt/completion, prompt/chosen/rejected: ultrachat and ultrafeedback rows)."""
    if "messages" in row:
        return None
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row and "prompt" not in row:
        return "alpaca"
    if "prompt" not in row and _is_hh_transcript(row.get("chosen")) and _is_hh_transcript(row.get("rejected")):
        return "hh"
    if "question" in row and "answer" in row and "prompt" not in row:
        return "question_answer"
    return None


def from_sharegpt(row: dict, where: str) -> dict:
    """ShareGPT: `conversations` of {from: human|gpt|system, value} -> messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns (ShareGPT)")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value' keys (ShareGPT), got {turn!r}"[:300])
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(
                f"{where}: conversations[{i}]: unknown speaker {turn['from']!r}; ShareGPT rows use "
                f"{', '.join(sorted(SHAREGPT_ROLES))}"
            )
        messages.append({"role": role, "content": _text(turn["value"], where, f"conversations[{i}] value")})
    rest = {k: v for k, v in row.items() if k != "conversations"}
    return {**rest, "messages": messages}


def from_alpaca(row: dict, where: str) -> dict:
    """Alpaca: instruction, optional input, output -> prompt / completion. The input follows the
    instruction after a blank line (how the Alpaca prompt puts the two together)."""
    for key in ("instruction", "output"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (Alpaca rows: instruction, input, output)")
    instruction, output = _text(row["instruction"], where, "instruction"), _text(row["output"], where, "output")
    extra = "" if _missing(row.get("input")) else as_text(row["input"])
    if extra is None:
        raise DataError(f"{where}: 'input' must be text (Alpaca), got {_kind(row['input'])}")
    prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "output")}
    return {**rest, "prompt": prompt, "completion": output}


def parse_hh_transcript(text, where: str, what: str) -> list[dict]:
    """An Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> messages."""
    if not _is_hh_transcript(text):
        raise DataError(
            f"{where}: {what} is not an HH transcript (turns starting '\\n\\nHuman: ' and '\\n\\nAssistant: ')"
        )
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: {what} has text before its first 'Human:' turn; an HH transcript starts with one")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def from_hh(row: dict, where: str) -> dict:
    """Anthropic HH-RLHF: chosen / rejected full transcripts as strings -> chosen / rejected
    conversations (their shared turns are the prompt), and `messages` = the chosen conversation, as
    ultrafeedback_binarized has it, so SFT and PPO read the same rows."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}; HH rows have chosen and rejected transcripts")
    chosen = parse_hh_transcript(row["chosen"], where, "chosen")
    rejected = parse_hh_transcript(row["rejected"], where, "rejected")
    return {**row, "chosen": chosen, "rejected": rejected, "messages": chosen}


def from_question_answer(row: dict, where: str) -> dict:
    """Question / answer rows (openai/gsm8k: the answer is the worked solution ending in `#### N`) -> prompt /
    completion, the answer kept as the row's reference for rule rewards (finetune.rl.rewards)."""
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: missing or non-string field {key!r} (question/answer rows, e.g. GSM8K)")
    rest = {k: v for k, v in row.items() if k != "question"}
    return {**rest, "prompt": row["question"], "completion": row["answer"]}


SOURCE_FORMATS = {
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "hh": from_hh,
    "question_answer": from_question_answer,
}


def source_row(row, fmt: str, where: str):
    """(row, format) with a public-data-set row (named by `format:` or detected) in a canonical shape;
    other rows pass through unchanged."""
    if not isinstance(row, dict):
        return row, fmt
    name = source_format(row) if fmt == "auto" else fmt
    if name in SOURCE_FORMATS:
        return SOURCE_FORMATS[name](row, where), "auto"
    return row, fmt


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "chosen" in row and "rejected" in row:
        return "preference"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "prompt" in row:
        return "prompt"
    return "unknown"


def to_conversation(row, fmt: str, where: str) -> dict:
    """Validate one SFT row and return {'messages': [...], 'answer': optional reference}."""
    row, fmt = source_row(row, fmt, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        messages = _messages(row.get("messages"), where, "messages")
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r} (prompt/completion format)")
        messages = _as_turns(row["prompt"], "user", where, "prompt") + _as_turns(
            row["completion"], "assistant", where, "completion"
        )
    else:
        raise DataError(
            f"{where}: cannot tell the row format from its keys {sorted(row)}; SFT rows need 'messages' "
            "(list of {role, content}) or 'prompt' and 'completion'"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add the assistant reply")
    return _with_answer({"messages": messages}, row)


def _split_shared_prefix(chosen: list[dict], rejected: list[dict], where: str):
    """Full chosen / rejected conversations sharing a prefix -> (prompt, chosen reply, rejected reply)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: chosen and rejected conversations share no prompt; give a 'prompt' field")
    return chosen[:n], chosen[n:], rejected[n:]


def _replies_after_prompt(prompt: list[dict], chosen: list[dict], rejected: list[dict], where: str):
    """A `prompt` beside chosen / rejected given as whole conversations (ultrafeedback_binarized:
    prompt is the first user turn, chosen = [user, assistant]): the conversations' shared turns are the
    prompt, checked to end with the given one. Replies given alone pass through."""
    if chosen[0]["role"] == "assistant" or rejected[0]["role"] == "assistant":
        return prompt, chosen, rejected  # replies (checked by the caller), not conversations
    shared, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
    user = [m["content"].strip() for m in shared if m["role"] == "user"]
    if not user or user[-1] != prompt[-1]["content"].strip():
        raise DataError(
            f"{where}: chosen and rejected are whole conversations, but their last shared user turn is not the "
            "row's 'prompt'; give replies only, or conversations that continue the prompt"
        )
    return shared, chosen, rejected


def to_preference(row, fmt: str, where: str) -> dict | None:
    """Validate one preference row -> {'prompt': messages, 'chosen': [assistant], 'rejected': [assistant]}.

    Accepts prompt + chosen/rejected as strings or messages, and chosen/rejected as full
    conversations sharing a prefix (no prompt), also next to a `prompt` that repeats their first user
    turn (ultrafeedback_binarized), and HH transcripts. Returns None for chosen == rejected (reported).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    shape = source_format(row) if fmt == "auto" else fmt
    if shape not in (None, "preference", "hh"):
        said = "are" if fmt == "auto" else "are named with format:"
        raise DataError(
            f"{where}: this stage needs preference rows (prompt/chosen/rejected, or HH transcripts); these rows "
            f"{said} {shape}"
        )
    row, _ = source_row(row, fmt, where)
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}; preference rows need prompt, chosen and rejected")
    if "prompt" in row:
        prompt = _as_turns(row["prompt"], "user", where, "prompt")
        chosen = _as_turns(row["chosen"], "assistant", where, "chosen")
        rejected = _as_turns(row["rejected"], "assistant", where, "rejected")
        prompt, chosen, rejected = _replies_after_prompt(prompt, chosen, rejected, where)
    else:
        prompt, chosen, rejected = _split_shared_prefix(
            _messages(row["chosen"], where, "chosen"), _messages(row["rejected"], where, "rejected"), where
        )
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise DataError(
                f"{where}: {name} must be one assistant reply after the prompt, got {[m['role'] for m in reply]}"
            )
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; it must end with the user's turn")
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        return None
    return _with_answer({"prompt": prompt, "chosen": chosen, "rejected": rejected}, row)


def to_unpaired(row, fmt: str, where: str) -> dict | None:
    """Validate one row for an unpaired-preference stage (KTO) -> {'prompt': messages, 'completion': [assistant],
    'label': bool} (TRL's unpaired preference format: label true = desirable), or a preference row as
    `to_preference` returns it, which `tokenize_unpaired` splits into a desirable and an undesirable row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    if fmt != "unpaired" and ("label" not in row or "completion" not in row):
        if fmt == "auto" and "completion" in row:
            raise DataError(
                f"{where}: a prompt/completion row needs a 'label' for this stage (true: a desirable reply, false: "
                "an undesirable one)"
            )
        return to_preference(row, "auto" if fmt == "unpaired" else fmt, where)
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}; unpaired rows need prompt, completion and label")
    label = row["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: label must be true or false (is the reply desirable?), got {label!r}")
    prompt = _as_turns(row["prompt"], "user", where, "prompt")
    completion = _as_turns(row["completion"], "assistant", where, "completion")
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise DataError(f"{where}: completion must be one assistant reply, got {[m['role'] for m in completion]}")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with the user's turn, got roles {[m['role'] for m in prompt]}")
    out = {"prompt": prompt, "completion": completion, "label": label}
    if row.get("answer") is not None:
        out["answer"] = str(row["answer"])
    return out


def to_prompt(row, fmt: str, where: str) -> dict:
    """Validate one row for a prompt-only stage (PPO) -> {'prompt': messages ending with a user turn,
    'answer': optional reference, 'example': the row's other fields (for rule-based rewards)}.

    Takes prompt-only rows, conversations (the turns before the last assistant reply), prompt /
    completion rows and preference rows (their prompt)."""
    row, fmt = source_row(row, fmt, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        messages = _messages(row.get("messages"), where, "messages")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif fmt == "preference" and "prompt" not in row:
        messages = _split_shared_prefix(
            _messages(row.get("chosen"), where, "chosen"), _messages(row.get("rejected"), where, "rejected"), where
        )[0]
    elif fmt in ("prompt", "prompt_completion", "preference"):
        if "prompt" not in row:
            raise DataError(f"{where}: missing field 'prompt'")
        messages = _as_turns(row["prompt"], "user", where, "prompt")
    else:
        raise DataError(
            f"{where}: cannot find a prompt in a row with keys {sorted(row)}; use 'prompt' (string or "
            "messages), 'messages' (a conversation) or preference rows"
        )
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn, got roles {[m['role'] for m in messages]}")
    example = {k: v for k, v in row.items() if k not in ("messages", "chosen", "rejected")}
    return _with_answer({"prompt": messages, "example": example}, row)


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts from a local file, for `finetune generate`: .txt (one user prompt per non-empty line) or
    jsonl / json / parquet / csv rows in any form `to_prompt` takes; a bad row stops with file and row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found")
    if path.suffix.lower() == ".txt":
        out = []
        for n, line in _text_lines(path):
            if isinstance(line, DataError):
                raise line
            if line.strip():
                prompt = [{"role": "user", "content": line.strip()}]
                out.append({"prompt": prompt, "example": {}, "where": f"{path}: line {n}"})
        if not out:
            raise DataError(f"{path}: no prompts in the file")
        return out
    if path.suffix.lower() not in LOCAL_FORMATS:
        raise DataError(
            f"{path}: unsupported prompts file; use .txt (one prompt per line) or one of {sorted(LOCAL_FORMATS)}"
        )
    out = []
    for n, row in _read_local(path):
        if isinstance(row, DataError):
            raise row
        out.append({**to_prompt(row, "auto", f"{path}: row {n}"), "where": f"{path}: row {n}"})
    if not out:
        raise DataError(f"{path}: no prompts in the file")
    return out


def tokenize_prompts(
    rows: list[dict],
    tokenizer,
    template: ChatTemplate,
    max_length: int,
    report: DataReport,
    name: str,
    unique: bool = False,
) -> tuple[list[list[int]], list[int]]:
    """(inference-prompt token ids, index of each kept row in `rows`); over-long prompts are counted and
    dropped, never truncated. With `unique`, a prompt seen before (preference data repeats one per
    pair) is kept once and counted."""
    ids, kept, seen = [], [], {}
    for i, row in enumerate(track(rows, f"tokenizing {name} prompts", unit="rows")):
        where = _check_row(row, tokenizer, template, name, i)
        huge = over_before_tokenizing(_contents(row["prompt"]), tokenizer, max_length)
        if huge:
            report.overlong(where, huge, "max_prompt_length", max_length)
            continue
        p = tokenize_prompt(tokenizer, row["prompt"])
        if unique and tuple(p) in seen:
            report.repeated_prompts += 1
            report.drop(where, f"repeats the prompt of {seen[tuple(p)]} (kept once)", "repeated_prompt")
            continue
        seen[tuple(p)] = where
        if len(p) > max_length:
            report.overlong(where, len(p), "max_prompt_length", max_length)
            continue
        ids.append(p)
        kept.append(i)
    report.close_overlong(name, len(ids), "prompt", "max_prompt_length", max_length)
    if report.repeated_prompts:
        log.info("%s: %d repeated prompts kept once (%d distinct)", name, report.repeated_prompts, len(ids))
    return ids, kept


def load_rows(
    sources: list[DataSource],
    recipe: Recipe,
    skip_bad_rows: bool,
    report: DataReport,
    seed: int,
    convert=None,
    hold_out: float = 0.0,
) -> tuple[list[dict], list[dict]]:
    """Read, validate (with `convert`, default: SFT conversations) and mix sources by weight
    (fraction of each source's rows, >1 repeats). With `hold_out`, that share of each source's
    distinct rows is set aside first (returned second), so repeats never leak into the held-out set.
    Each row keeps `where` (file and row) for later error messages."""
    convert = convert or to_conversation
    rng = random.Random(seed)
    mixed, held = [], []
    for source in sources:
        name, rows = read_source(source, recipe)
        good = []
        for n, row in track(rows, f"reading {name}", unit="rows"):
            report.read += 1
            where = f"{name}: row {n}"
            try:
                if isinstance(row, DataError):
                    raise row
                converted = convert(row, source.format, where)
                if converted is None:  # valid but useless (e.g. chosen == rejected): counted, not trained on
                    report.skipped_useless += 1
                    report.drop(where, "chosen and rejected are identical: no learning signal", "no_signal")
                    continue
                unscored = converted.pop(UNSCORED, None)
                if unscored:
                    report.unscored += 1
                    report.drop(where, unscored, "unusable_answer")
                good.append({**converted, "where": where})
            except DataError as e:
                if not skip_bad_rows:
                    raise DataError(f"{e} (or set data.skip_bad_rows: true to skip and count such rows)") from None
                report.skipped_bad += 1
                report.drop(where, str(e).removeprefix(f"{where}: "), "malformed")
        if hold_out:
            rng.shuffle(good)
            k = max(1, round(len(good) * hold_out))
            held, good = held + good[:k], good[k:]
        skipped = [d for d in report.drops if d["source"] == name and d["kind"] in ("malformed", "no_signal")]
        if skipped:
            log.warning(
                "%s: %d rows skipped: %s",
                name,
                len(skipped),
                "; ".join(f"row {d['row']} ({d['reason']})" for d in skipped[:3])
                + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
                + " (all in dropped_rows.jsonl of the stage output)",
            )
        unscored = [d for d in report.drops if d["source"] == name and d["kind"] == "unusable_answer"]
        if unscored:
            log.warning(
                "%s: %d rows have an answer column whose value cannot be compared (null, NaN or empty): they are "
                "used, but not scored for correctness: %s",
                name,
                len(unscored),
                "; ".join(f"row {d['row']} ({d['reason']})" for d in unscored[:3])
                + (f"; and {len(unscored) - 3} more" if len(unscored) > 3 else "")
                + " (all in dropped_rows.jsonl of the stage output)",
            )
        whole = int(source.weight)
        take = good * whole + rng.sample(good, round((source.weight - whole) * len(good)))
        log.info("%s: %d valid rows, weight %g -> %d rows", name, len(good), source.weight, len(take))
        mixed += take
    rng.shuffle(mixed)
    return mixed, held


def train_eval_rows(section: DataSection, recipe: Recipe, seed: int, convert=None):
    """(train rows, eval rows, train report, eval report) with the held-out split made if needed."""
    train_report, eval_report = DataReport(), DataReport()
    hold_out = 0.0 if section.eval else section.eval_fraction
    train, evals = load_rows(section.train, recipe, section.skip_bad_rows, train_report, seed, convert, hold_out)
    if section.eval:
        evals, _ = load_rows(section.eval, recipe, section.skip_bad_rows, eval_report, seed, convert)
    else:
        eval_report.read = len(evals)
    if section.max_eval_rows is not None and len(evals) > section.max_eval_rows:
        cut_held_out(evals, section.max_eval_rows, eval_report)
        evals = evals[: section.max_eval_rows]
    if not train:
        raise DataError(f"{recipe.source}: data.train: no usable training rows")
    if not evals:
        raise DataError(f"{recipe.source}: data.eval: no usable held-out rows; add eval sources or fix them")
    return train, evals, train_report, eval_report


def cut_held_out(evals: list[dict], limit: int, report: DataReport) -> None:
    """Record (and say) that held-out rows beyond data.max_eval_rows are left out: the figures are
    measured on the first `limit` rows only."""
    report.left_out = len(evals) - limit
    for row in evals[limit:]:
        report.drop(row.get("where", "held-out"), f"beyond data.max_eval_rows {limit}", "max_eval_rows")
    log.warning(
        "eval: %d held-out rows, the first %d used (data.max_eval_rows); %d left out: %s",
        len(evals),
        limit,
        report.left_out,
        report.named("max_eval_rows"),
    )


# ---------------------------------------------------------------- tokenization


def over_before_tokenizing(texts, tokenizer, limit: int) -> str | None:
    """How `texts` (one row's, as one sequence) are known to be longer than `limit` tokens without tokenizing
    them (chat_template.least_tokens), or None when only the tokenizer can tell. Checked before every row is
    tokenized, so one huge row is counted as over-long instead of aborting the tokenizer."""
    chars = sum(len(t) for t in texts)
    least = least_tokens(chars, tokenizer)
    return f"{chars:,} characters, at least {least:,} tokens (not tokenized)" if least > limit else None


def _contents(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages]


def _check_row(row: dict, tokenizer, template: ChatTemplate, name: str, i: int) -> str:
    """Where the row came from; refuses content that spells a special token, which would be read as
    that token (e.g. a literal <|endoftext|> ending a reply early) instead of as text."""
    where = row.get("where", f"{name}: row {i + 1}")
    texts = [
        m["content"] for key in ("messages", "prompt", "chosen", "rejected", "completion") for m in row.get(key, [])
    ]
    for text in texts:
        found = find_special_token(text, tokenizer, template.end_of_turn_token(tokenizer))
        if found:
            raise DataError(
                f"{where}: content contains the special token {found!r}, which would be read as that "
                "token, not as text; remove or escape it"
            )
    return where


def tokenize_preferences(
    rows: list[dict],
    tokenizer,
    template: ChatTemplate,
    max_length: int,
    on_overlong: str,
    report: DataReport,
    name: str,
):
    """datasets.Dataset of prompt_ids / chosen_ids / rejected_ids (replies through their end-of-turn)."""
    from datasets import Dataset

    cols = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i, row in enumerate(track(rows, f"tokenizing {name} pairs", unit="rows")):
        where = _check_row(row, tokenizer, template, name, i)
        longer = max(row["chosen"][0]["content"], row["rejected"][0]["content"], key=len)
        huge = over_before_tokenizing([*_contents(row["prompt"]), longer], tokenizer, max_length)
        if huge:
            report.overlong(where, huge, "max_length", max_length, on_overlong)
            continue
        p, c = tokenize_reply(tokenizer, template, row["prompt"], row["chosen"][0]["content"])
        _, r = tokenize_reply(tokenizer, template, row["prompt"], row["rejected"][0]["content"])
        longest = len(p) + max(len(c), len(r))
        if longest > max_length:
            report.overlong(where, longest, "max_length", max_length, on_overlong)
            continue
        for key, value in (("prompt_ids", p), ("chosen_ids", c), ("rejected_ids", r)):
            cols[key].append(value)
    report.close_overlong(name, len(cols["prompt_ids"]), "pair", "max_length", max_length)
    return Dataset.from_dict(cols)


def tokenize_unpaired(
    rows: list[dict],
    tokenizer,
    template: ChatTemplate,
    max_length: int,
    on_overlong: str,
    report: DataReport,
    name: str,
):
    """datasets.Dataset of prompt_ids / completion_ids / label (TRL's KTO columns; replies through their
    end-of-turn). A preference row gives two rows: its chosen reply desirable, its rejected one not."""
    from datasets import Dataset

    cols = {"prompt_ids": [], "completion_ids": [], "label": []}
    for i, row in enumerate(track(rows, f"tokenizing {name} rows", unit="rows")):
        where = _check_row(row, tokenizer, template, name, i)
        replies = (
            [(row["completion"][0]["content"], row["label"])]
            if "completion" in row
            else [(row["chosen"][0]["content"], True), (row["rejected"][0]["content"], False)]
        )
        tokenized = [(tokenize_reply(tokenizer, template, row["prompt"], text), label) for text, label in replies]
        longest = max(len(p) + len(c) for (p, c), _ in tokenized)
        if longest > max_length:
            report.overlong(where, longest, "max_length", max_length, on_overlong)
            continue
        for (p, c), label in tokenized:
            cols["prompt_ids"].append(p)
            cols["completion_ids"].append(c)
            cols["label"].append(label)
    report.close_overlong(name, len(cols["prompt_ids"]), "row", "max_length", max_length)
    return Dataset.from_dict(cols)


def tokenize_conversations(
    rows: list[dict],
    tokenizer,
    template: ChatTemplate,
    max_length: int,
    on_overlong: str,
    report: DataReport,
    name: str,
):
    """datasets.Dataset of input_ids / labels; rows over max_length are counted, never truncated."""
    from datasets import Dataset

    ids, labels = [], []
    for i, row in enumerate(track(rows, f"tokenizing {name} conversations", unit="rows")):
        where = _check_row(row, tokenizer, template, name, i)
        huge = over_before_tokenizing(_contents(row["messages"]), tokenizer, max_length)
        if huge:
            report.overlong(where, huge, "max_length", max_length, on_overlong)
            continue
        x, y = tokenize_conversation(tokenizer, template, row["messages"])
        if len(x) > max_length:
            report.overlong(where, len(x), "max_length", max_length, on_overlong)
            continue
        ids.append(x)
        labels.append(y)
    report.close_overlong(name, len(ids), "row", "max_length", max_length)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})
