"""Dotted `key=value` overrides, as every command takes them after the recipe path."""

from __future__ import annotations

from typing import Any

import yaml

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
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise RecipeError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. {key}='\"{raw}\"'"
            ) from None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each override in the raw recipe mapping (creating missing sections)."""
    for path, value in parse_overrides(overrides):
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise RecipeError(f"override {'.'.join(path)}: {part} is not a section")
            node = node[part]
        node[path[-1]] = value
    return raw
