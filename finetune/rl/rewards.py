"""Rule-based rewards for PPO (`ppo.reward_function: finetune.rl.rewards:NAME`).

A rule reward is any function f(prompt, response) or f(prompt, response, example) -> float, where
prompt is the last user message, response the decoded reply (up to its end-of-turn token) and
example the data row (e.g. its reference `answer`). Verifiable tasks need no reward model.
"""

from __future__ import annotations

from finetune.core.evaluation import same_answer


def exact_answer(prompt: str, response: str, example: dict) -> float:
    """1.0 when the reply gives the row's `answer` (case, spacing and a final period ignored; numbers by value,
    so 42 == 42.0 == "42"), else 0.0. A row whose answer is null, NaN or empty scores 0.0 (the loader counted
    and named it)."""
    if "answer" not in example:
        raise ValueError("exact_answer needs an 'answer' field in every prompt row")
    return float(same_answer(response, example["answer"]))
