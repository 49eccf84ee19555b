"""Dotted `key=value` overrides, as every command takes them after the recipe path."""

from __future__ import annotations

import datetime
from typing import Any

from finetune.readers import load_yaml

from .errors import RecipeError


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`sft.max_steps=20` -> (["sft", "max_steps"], 20); values are read as YAML."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected KEY=VALUE, e.g. sft.max_steps=20")
        key, raw = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise RecipeError(f"override {item!r}: empty key; write it as section.key=value, e.g. sft.max_steps=20")
        try:
            value = load_yaml(raw, "the value", RecipeError) if raw != "" else None
            if isinstance(value, (datetime.date, datetime.datetime)):
                value = raw  # YAML reads 2024-01-01 as a date; every recipe key that takes one wants the text
        except RecipeError as e:
            problem = str(e).removeprefix("the value: ").removeprefix("line 1: ")
            if problem.startswith("not valid YAML"):
                problem = f"the value is {problem}; quote it if it is text, e.g. {key}='\"{raw}\"'"
            raise RecipeError(f"override {item!r}: {problem}") from None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each override in the raw recipe mapping (creating missing sections)."""
    for path, value in parse_overrides(overrides):
        node = raw
        for depth, part in enumerate(path):
            key = ".".join(path[: depth + 1])
            last = depth == len(path) - 1
            if isinstance(node, list):  # e.g. sft.data.train.0.path: the first source
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(
                        f"override {'.'.join(path)}: {'.'.join(path[:depth])} is a list of {len(node)}; index it "
                        f"with a number from 0 to {len(node) - 1}, or set the whole list (e.g. "
                        f"{'.'.join(path[:depth])}='[{{path: data.jsonl}}]')"
                    )
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"override {'.'.join(path)}: {'.'.join(path[:depth])} is not a section")
            elif not last and node.get(part) is None:
                node[part] = {}
            if last:
                node[part] = value
            else:
                node = node[part]
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override {'.'.join(path)}: {key} is not a section")
    return raw
