"""How a stage's figures are shown: the closing summary every stage prints, and the figures of tables."""

from __future__ import annotations

import sys


def print_summary(title: str, lines: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in lines)
    print(f"\n== {title} ==", file=sys.stderr)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}", file=sys.stderr)


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def figure(value, metric: str | None = None) -> str:
    """A metric value for a table: accuracies as percentages, small numbers in scientific notation."""
    if value is None:
        return "n/a"
    if metric and "accuracy" in metric:
        return rate(value)
    if isinstance(value, float) and abs(value) < 1e-3 and value != 0:
        return f"{value:.1e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
