"""Verifiable (rule) rewards for the RL stages: `rewards: [{function: finetune.rl.rewards:NAME, ...}]`.

A rule reward is a plain function

    f(prompt: str, response: str, example: dict, **declared) -> float

- `prompt`: the last user message of the prompt;
- `response`: the decoded reply, up to (not including) its end-of-turn token, special tokens kept (so
  a reply that emits one can be told apart from one that does not);
- `example`: the data row (its `answer` and any other column). Two-argument functions
  `f(prompt, response)` work too.
- Keywords the function declares by name get these values (found by signature inspection once, when
  the recipe is loaded; a function that declares none is called with none):
  `stopped: bool` (the reply reached the end-of-turn token, i.e. it was not cut at the length limit),
  `response_tokens: int` (reply tokens, the end-of-turn token included when reached),
  `response_limit: int` (the stage's limit on reply tokens), and
  `special_tokens: list[str]` (the tokenizer's special tokens).
- Anything else the function takes comes from the recipe entry's `kwargs:`.

The functions below are shipped; each returns a float, and a reward that cannot be computed for a row
(e.g. no `answer`) raises, which stops the stage naming the function, the row and the response.
"""

from __future__ import annotations

import math
import re

from finetune.core.evaluation import same_answer

# A number as people write it: optional sign, digits with optional thousands commas ("1,234,567"), optional
# decimals. A comma not followed by exactly three digits ends the number ("3,4" is two numbers).
_NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])[-−]?\.\d+(?![\d])")
_FRACTION = re.compile(r"^\s*([-−]?)\s*(?:\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}|(\d+)\s*/\s*(\d+))\s*$")
_BOXED = "\\boxed{"


def _reference(example: dict, key: str, name: str) -> object:
    if key not in example:
        raise ValueError(f"{name} needs a {key!r} field in every prompt row")
    return example[key]


def _unusable(answer) -> bool:
    """An answer the data loader counted as unusable (null, NaN, empty; core.data.answer_of): the row is
    trained on but scores 0.0, as in held-out correctness."""
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return True
    return isinstance(answer, str) and not answer.strip()


def exact_answer(prompt: str, response: str, example: dict, answer_key: str = "answer") -> float:
    """1.0 when the reply gives the row's `answer` as held-out correctness judges it
    (finetune.core.evaluation.same_answer: case, spacing and a final period ignored; numbers by value, so
    42 == 42.0 == "42"), else 0.0. `answer_key` names another column. A row without the column raises; one
    whose answer is null, NaN or empty scores 0.0 (the loader counted and named it)."""
    return float(same_answer(response, _reference(example, answer_key, "exact_answer")))


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("−", "-"))


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas in numbers, signs and decimals understood), or None."""
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _boxed(text: str) -> list[str]:
    """The contents of every \\boxed{...} in `text`, braces balanced (\\boxed{\\frac{1}{2}} is one box)."""
    out, start = [], 0
    while (i := text.find(_BOXED, start)) >= 0:
        depth, j = 1, i + len(_BOXED)
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:  # unclosed: not an answer
            break
        out.append(text[i + len(_BOXED) : j - 1])
        start = j
    return out


def extract_answer(text: str) -> float | None:
    """The final numeric answer of a reply, by the first rule that finds one:
    1. GSM8K's `#### 42` (the first number after the last `####`);
    2. `\\boxed{42}` (LaTeX, as MATH-style replies end): the LAST box wins when there are several, as in
       lm-evaluation-harness's MATH answer extraction (a reply that revises itself boxes the final one last);
    3. the last number in the reply.
    Inside a box a fraction (\\frac{1}{2}, \\dfrac{1}{2}, 1/2) is its value; elsewhere "1/2" is two numbers.
    Commas in numbers ("1,234"), signs ("-5", "−5"), decimals ("0.5", ".5") and units or currency around
    the number ("$42", "42 km") are understood; None when the reply holds no number."""
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])
        if numbers:
            return _to_float(numbers[0])
    boxes = _boxed(text)
    if boxes:
        return _fraction(boxes[-1]) if _FRACTION.match(boxes[-1]) else last_number(boxes[-1])
    return last_number(text)


def _fraction(box: str) -> float | None:
    sign, num, den, num2, den2 = _FRACTION.match(box).groups()
    num, den = int(num or num2), int(den or den2)
    return None if den == 0 else (-1 if sign else 1) * num / den


def _close(got: float, want: float, tolerance: float, relative: float) -> bool:
    """|got - want| within `tolerance`, or within `relative` x |want| (of the reference, not of the larger
    one as math.isclose has it)."""
    return abs(got - want) <= max(tolerance, relative * abs(want))


def numeric_answer(
    prompt: str,
    response: str,
    example: dict,
    tolerance: float = 1e-6,
    relative: float = 0.0,
    answer_key: str = "answer",
) -> float:
    """1.0 when the reply's final number (extract_answer: `#### N`, else the last `\\boxed{N}`, else the
    last number) is within `tolerance` (absolute) or `relative` (fraction of the reference) of the row's
    answer, else 0.0 (also when the reply has no number). The reference is read the same way, so it may
    be a number (42, 42.0), a string ("42", "1,234") or a whole GSM8K solution ending "#### 42". A row
    without the column raises; one whose answer is null, NaN or empty scores 0.0 (the loader counted it)."""
    reference = _reference(example, answer_key, "numeric_answer")
    if _unusable(reference):
        return 0.0
    if isinstance(reference, bool) or not isinstance(reference, (int, float, str)):
        raise ValueError(f"numeric_answer: the {answer_key!r} field must be a number or text, got {reference!r}")
    want = float(reference) if isinstance(reference, (int, float)) else extract_answer(reference)
    if want is None or not math.isfinite(want):
        raise ValueError(f"numeric_answer: no number in the {answer_key!r} field {reference!r}")
    got = extract_answer(response)
    return float(got is not None and _close(got, want, tolerance, relative))


def format_reward(
    prompt: str,
    response: str,
    example: dict,
    stopped: bool,
    special_tokens: list[str],
    pattern: str | None = None,
) -> float:
    """1.0 when the reply is well formed, else 0.0: it reached the template's end-of-turn token (was not
    cut at the length limit), contains no special token (a reply that emits `<|endoftext|>` or a role
    token mid-turn is broken whatever it says), and, when `pattern` (a Python regular expression) is
    given, matches it as a whole (re.fullmatch, DOTALL: e.g. "<think>.*</think>.*" or ".*#### -?\\d+")."""
    if not stopped or any(t and t in response for t in special_tokens):
        return 0.0
    return float(pattern is None or re.fullmatch(pattern, response.strip(), re.DOTALL) is not None)


def length_penalty(
    prompt: str,
    response: str,
    example: dict,
    response_tokens: int,
    response_limit: int,
    max_tokens: int | None = None,
    buffer: int | None = None,
) -> float:
    """DAPO's soft over-long punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13): 0 up to
    `max_tokens - buffer` reply tokens, then falling linearly to -1 at `max_tokens` and beyond. `max_tokens`
    defaults to the stage's reply limit (`response_limit`: a reply cut there gets -1); `buffer` to a fifth
    of it (DAPO: 4,096 of 20,480). Give it a weight beside the task reward, e.g. 0.5."""
    limit = response_limit if max_tokens is None else max_tokens
    buffer = max(1, limit // 5) if buffer is None else buffer
    if limit <= 0 or not 0 < buffer <= limit:
        raise ValueError(f"length_penalty: needs 0 < buffer ({buffer}) <= max_tokens ({limit})")
    start = limit - buffer
    if response_tokens <= start:
        return 0.0
    return max(-1.0, (start - response_tokens) / buffer)
