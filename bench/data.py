"""Benchmark data made in code: chat rows with a realistic spread of lengths (no network).

Real chat data (e.g. UltraChat) has a long-tailed length distribution: most conversations are
short, a few are near the context limit. Turn lengths here are lognormal (prompt median
max_length/12, reply median max_length/6, sigma 0.9 / 0.8) and whole conversations are kept under
max_length, so a padded batch of 16 is mostly padding to its longest row, as in real training.
Words are single tokens of the tokenizer, so a turn of n words is n tokens.
"""

from __future__ import annotations

import random


def _words(tokenizer) -> list[str]:
    """Vocabulary entries that are one token with a leading space (byte-level BPE 'Ġword')."""
    vocab = tokenizer.get_vocab()
    words = sorted(t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2)
    if len(words) < 20:
        raise ValueError("tokenizer has too few whole-word tokens to make benchmark text")
    return words


def _lengths(rng: random.Random, max_length: int, overhead: int) -> tuple[int, int]:
    budget = max_length - overhead
    while True:
        p = max(1, round(rng.lognormvariate(0, 0.9) * max_length / 12))
        r = max(1, round(rng.lognormvariate(0, 0.8) * max_length / 6))
        if p + r <= budget:
            return p, r


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def chat_rows(tokenizer, n: int, max_length: int, seed: int = 0) -> list[dict]:
    """SFT rows {'messages': [user, assistant]} whose rendered length is at most max_length tokens."""
    rng, words = random.Random(seed), _words(tokenizer)
    rows = []
    for _ in range(n):
        p, r = _lengths(rng, max_length, overhead=16)  # template words and the end-of-turn token
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": _text(rng, words, p)},
                    {"role": "assistant", "content": _text(rng, words, r)},
                ]
            }
        )
    return rows


def preference_rows(tokenizer, n: int, max_length: int, seed: int = 0) -> list[dict]:
    """DPO rows {'prompt', 'chosen', 'rejected'} (conversational), each side under max_length."""
    rng, words = random.Random(seed), _words(tokenizer)
    rows = []
    for _ in range(n):
        p, r = _lengths(rng, max_length, overhead=16)
        r2 = max(1, min(r, round(r * rng.lognormvariate(0, 0.3))))
        rows.append(
            {
                "prompt": [{"role": "user", "content": _text(rng, words, p)}],
                "chosen": [{"role": "assistant", "content": _text(rng, words, r)}],
                "rejected": [{"role": "assistant", "content": _text(rng, words, r2)}],
            }
        )
    return rows


def prompt_rows(tokenizer, n: int, max_prompt_length: int, seed: int = 0) -> list[dict]:
    """PPO prompts {'prompt': [user]} of lognormal length under max_prompt_length."""
    rng, words = random.Random(seed), _words(tokenizer)
    rows = []
    for _ in range(n):
        while True:
            p = max(1, round(rng.lognormvariate(0, 0.9) * max_prompt_length / 4))
            if p <= max_prompt_length - 8:
                break
        rows.append({"prompt": [{"role": "user", "content": _text(rng, words, p)}]})
    return rows
