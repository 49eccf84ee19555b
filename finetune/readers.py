"""The one way finetune reads the text a user gives it: recipes, overrides, accelerate and DeepSpeed configs,
data files (jsonl, json, csv, txt prompts), chat templates, the Azure ML workspace config.

Three rules, the same for every file and every reader:
- **UTF-8, with or without a byte-order mark.** Editors on Windows (Notepad, Excel's "CSV UTF-8") write a
  BOM; Python's "utf-8" codec keeps it as U+FEFF, which json refuses and which would otherwise end up
  inside the first key or the first prompt. Bytes that are not UTF-8 are an error naming the line.
- **A key given twice is an error**, at every nesting level of YAML and JSON. Both formats leave it
  to the reader (YAML 1.2 says keys must be unique, PyYAML and json keep the last silently), so a recipe
  with two `sft:` sections would train with only the second.
- **Bounded YAML.** Aliases let a few lines stand for an exponential number of nodes ("billion laughs":
  nine anchors of nine aliases each are 387 million strings); PyYAML builds them as shared objects, and
  whatever walks the result (validation, `finetune config`) runs out of time or memory. The document
  is measured with every alias expanded, before anything is built from it, and refused past
  MAX_YAML_NODES nodes or MAX_DEPTH levels; a recursive alias is refused too. JSON has no aliases; its
  nesting is bounded the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import UserError

MAX_YAML_NODES = 100_000  # a recipe is a few hundred nodes; the limit only stops documents built to explode
MAX_YAML_BYTES = 1 << 20  # 1 MiB: a recipe or config is a few KB
MAX_DEPTH = 100  # nesting levels in YAML or JSON (a recipe has five)
BOM = "\ufeff"


def decode(data: bytes, source: str, error: type[UserError] = UserError, what: str = "the file") -> str:
    """UTF-8 text with a leading byte-order mark removed; bytes that are not UTF-8 are `error` naming the line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{source}: line {line}: not UTF-8 text (byte {e.start + 1}); save {what} as UTF-8") from None
    return text.removeprefix(BOM)


def read_text(path: str | Path, error: type[UserError] = UserError, what: str = "the file") -> str:
    return decode(Path(path).read_bytes(), str(path), error, what)


# ----------------------------------------------------------------------------- YAML


class YAMLLimitError(yaml.YAMLError):
    pass


class DuplicateKeyYAMLError(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (merge keys `<<:` may still be
    overridden by an explicit key, as YAML's merge type says) and documents whose aliases expand past
    the limits above."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set(), 0)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    seen = key in first_line
                except TypeError:
                    continue  # an unhashable key: SafeConstructor reports it
                if seen:
                    raise DuplicateKeyYAMLError(
                        None,
                        None,
                        f"the key {key!r} is given twice in one mapping (first on line {first_line[key]}); the second "
                        "would silently replace the first: keep one",
                        key_node.start_mark,
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node, sizes: dict, open_: set, depth: int) -> int:
    """Nodes of `node` with every alias expanded (shared nodes counted once per use), memoised per node."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YAMLLimitError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it (recursive)")
    if depth > MAX_DEPTH:
        raise YAMLLimitError(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [x for pair in node.value for x in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_, depth + 1)
        if total > MAX_YAML_NODES:
            raise YAMLLimitError(
                f"line {node.start_mark.line + 1}: more than {MAX_YAML_NODES:,} values once its aliases (*name) are "
                "expanded (aliases nested inside aliases multiply)"
            )
    open_.discard(key)
    sizes[key] = total
    return total


def load_yaml(text: str, source: str, error: type[UserError] = UserError) -> Any:
    """A YAML document under the rules of this module; any problem is `error` naming `source` and the line."""
    text = text.removeprefix(BOM)
    if len(text) > MAX_YAML_BYTES:
        raise error(f"{source}: {len(text):,} characters, more than a recipe or config can need ({MAX_YAML_BYTES:,})")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except YAMLLimitError as e:
        raise error(f"{source}: refused: {e}; write the values out, or use fewer nested aliases") from None
    except DuplicateKeyYAMLError as e:
        raise error(f"{source}: line {e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        context = f" {e.context}" if e.context else ""
        raise error(f"{source}: not valid YAML ({where}{e.problem}{context})") from None
    except yaml.YAMLError as e:
        raise error(f"{source}: not valid YAML ({e})") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply to read (over {MAX_DEPTH} levels)") from None


def read_yaml(path: str | Path, error: type[UserError] = UserError) -> Any:
    return load_yaml(read_text(path, error), str(path), error)


# ----------------------------------------------------------------------------- JSON


class DuplicateKeyError(ValueError):
    pass


def _twice_message(key: str, keys: list[str]) -> str:
    return (
        f"the key {key!r} is given twice in one object (keys {keys}); the second would silently replace the first: "
        "keep one"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(_twice_message(key, [k for k, _ in pairs]))
        out[key] = value
    return out


class _Marked(dict):
    """An object that had a key twice (`duplicates="mark"`): the row holding it is refused, not the file."""

    duplicate = ""


def _mark_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    keys = [k for k, _ in pairs]
    marked = _Marked(out)
    marked.duplicate = _twice_message(next(k for k in keys if keys.count(k) > 1), keys)
    return marked


def find_duplicate(value) -> str | None:
    """The message for a key given twice anywhere inside `value` (parsed with duplicates="mark"), else None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Marked) and item.duplicate:
            return item.duplicate
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping past `limit`."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((x, level + 1) for x in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str, duplicates: str = "refuse") -> Any:
    """json.loads under the rules of this module: raises ValueError (json.JSONDecodeError, DuplicateKeyError, or
    one for nesting) with a message for the user; the caller names the file and row. With duplicates="mark", an
    object with a key given twice is kept but marked, for find_duplicate (a file of rows refuses only that row)."""
    hook = _no_duplicates if duplicates == "refuse" else _mark_duplicates
    try:
        value = json.loads(text.removeprefix(BOM), object_pairs_hook=hook)
    except RecursionError:
        raise ValueError(f"nested too deeply to read (over {MAX_DEPTH} levels)") from None
    if _depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return value


def read_json(path: str | Path, error: type[UserError] = UserError) -> Any:
    """A whole JSON file under the rules of this module; a problem is `error` naming the file and line."""
    try:
        return parse_json(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise error(f"{path}: {e}") from None
