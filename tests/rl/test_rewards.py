"""The shipped rule rewards on their edge cases, how a rule function is loaded (signature checked at load,
declared keywords passed in) and how a failing one stops the stage (function, row and response named)."""

import re
import sys
from types import SimpleNamespace

import pytest
import torch

from finetune.recipe import RecipeError, load_recipe
from finetune.rl import rewards as R
from finetune.rl.rules import RewardFunctionError, load_rules
from finetune.rl.scoring import Scorer
from tests.conftest import TINY_RECIPE


def test_exact_answer_normalises_like_held_out_correctness_and_compares_numbers_by_value():
    assert R.exact_answer("q", "  Paris. ", {"answer": "paris"}) == 1.0
    assert R.exact_answer("q", "the  Big   dog", {"answer": "The big dog."}) == 1.0
    assert R.exact_answer("q", "Lyon", {"answer": "Paris"}) == 0.0
    assert R.exact_answer("q", "42", {"answer": 42.0}) == 1.0  # a float column: by value, not "42.0"
    assert R.exact_answer("q", "42.", {"answer": 42}) == 1.0
    assert R.exact_answer("q", "43", {"answer": 42}) == 0.0
    assert R.exact_answer("q", "yes", {"label": "yes"}, answer_key="label") == 1.0
    with pytest.raises(ValueError, match="needs a 'answer' field"):
        R.exact_answer("q", "x", {})


@pytest.mark.parametrize(
    "reply, value",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72),  # GSM8K's final line wins over earlier numbers
        ("#### 1,234,567", 1234567),  # thousands commas
        ("#### -5", -5),
        ("step 1 #### 3 ... revised #### 4", 4),  # the last #### mark
        ("so \\boxed{12} and finally \\boxed{13}", 13),  # several boxes: the last one wins
        ("\\boxed{\\frac{3}{4}}", 0.75),  # a LaTeX fraction in a box is its value
        ("\\boxed{-1/2}", -0.5),
        ("The total is $1,299.50 in all.", 1299.5),  # currency, commas and decimals
        ("It is −7 degrees", -7),  # the Unicode minus sign
        ("about .5 of it", 0.5),
        ("12 apples, then 30 km", 30),  # units: the last number
        ("5-3", 3),  # a hyphen after a digit is not a sign
        ("3,4", 4),  # not a thousands group: two numbers
        ("no number here", None),
    ],
)
def test_extract_answer(reply, value):
    assert R.extract_answer(reply) == value


def test_numeric_answer_with_tolerance_and_every_reference_form():
    assert R.numeric_answer("q", "The answer is 72.", {"answer": 72}) == 1.0
    assert R.numeric_answer("q", "The answer is 72.", {"answer": "He had 3 + 69 = 72\n#### 72"}) == 1.0
    assert R.numeric_answer("q", "#### 1,000", {"answer": "1000"}) == 1.0
    assert R.numeric_answer("q", "3.14", {"answer": 3.14159}) == 0.0
    assert R.numeric_answer("q", "3.14", {"answer": 3.14159}, tolerance=0.01) == 1.0
    assert R.numeric_answer("q", "105", {"answer": 100}, relative=0.1) == 1.0
    assert R.numeric_answer("q", "111", {"answer": 100}, relative=0.1) == 0.0
    assert R.numeric_answer("q", "I do not know", {"answer": 7}) == 0.0
    with pytest.raises(ValueError, match="no number in the 'answer' field"):
        R.numeric_answer("q", "7", {"answer": "seven"})
    with pytest.raises(ValueError, match="needs a 'answer' field"):
        R.numeric_answer("q", "7", {})
    for unusable in (None, float("nan"), " "):  # counted by the loader: trained on, scored 0 (as exact_answer)
        assert R.numeric_answer("q", "7", {"answer": unusable}) == 0.0
        assert R.exact_answer("q", "7", {"answer": unusable}) == 0.0


def test_format_reward_needs_the_stop_no_special_token_and_the_pattern():
    special = ["<|endoftext|>", "<|user|>"]
    assert R.format_reward("q", "#### 4", {}, stopped=True, special_tokens=special) == 1.0
    assert R.format_reward("q", "#### 4", {}, stopped=False, special_tokens=special) == 0.0  # cut at the limit
    assert R.format_reward("q", "4 <|user|> hi", {}, stopped=True, special_tokens=special) == 0.0
    assert R.format_reward("q", "so #### 4", {}, True, special, pattern=r".*#### -?\d+") == 1.0
    assert R.format_reward("q", "so 4", {}, True, special, pattern=r".*#### -?\d+") == 0.0


def test_length_penalty_is_dapos_soft_overlong_punishment():
    def pen(n, **kw):
        return R.length_penalty("q", "r", {}, response_tokens=n, response_limit=20, **kw)

    assert pen(16) == 0.0 and pen(18) == -0.5 and pen(20) == -1.0  # buffer = 20 // 5 = 4
    assert pen(5, max_tokens=10, buffer=10) == -0.5 and pen(30) == -1.0  # beyond the limit: -1
    with pytest.raises(ValueError, match="buffer"):
        pen(5, buffer=0)


def _recipe(rewards: str, tmp_path, module: str | None = None):
    """The tiny recipe in tmp_path with `rewards`; `module` is written beside it as my_rules.py (dropped from
    the import cache first: every test has its own)."""
    sys.modules.pop("my_rules", None)
    if module:
        (tmp_path / "my_rules.py").write_text(module)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(TINY_RECIPE.read_text().replace("../data/", f"{TINY_RECIPE.parent.parent}/data/"))
    return load_recipe(recipe_file, [f"ppo.rewards={rewards}"])


def test_a_rule_of_the_wrong_arity_is_refused_at_load_naming_it(tmp_path):
    module = "def one(response):\n    return 1.0\n\ndef tol(prompt, response, example):\n    return 1.0\n"
    with pytest.raises(RecipeError, match=r"ppo.rewards\[0\]: reward function my_rules:one\(response\) cannot be"):
        load_rules(_recipe("[{function: my_rules:one}]", tmp_path, module), "ppo")
    with pytest.raises(RecipeError, match=r"my_rules:tol.* with tolerance"):  # an unknown keyword
        load_rules(_recipe("[{function: my_rules:tol, kwargs: {tolerance: 1}}]", tmp_path, module), "ppo")
    with pytest.raises(RecipeError, match="kwargs .'stopped'.: the stage itself passes"):
        _recipe("[{function: my_rules:tol, kwargs: {stopped: true}}]", tmp_path, module)


def test_each_recipe_gets_the_module_beside_it_and_a_module_that_fails_is_named(tmp_path):
    """Two recipes in one process, each with its own my_rules.py: each gets its own (not the first one imported,
    which the import cache would give); a module that raises as it is imported is one message naming it."""
    first, second, broken = (tmp_path / name for name in ("first", "second", "broken"))
    for folder, body in (
        (first, "def a(prompt, response):\n    return 1.0\n"),
        (second, "def b(prompt, response):\n    return 2.0\n"),
    ):
        folder.mkdir()
        (folder / "my_rules.py").write_text(body)
        (folder / "recipe.yaml").write_text(
            TINY_RECIPE.read_text().replace("../data/", f"{TINY_RECIPE.parent.parent}/data/")
        )
    rules = [
        load_rules(load_recipe(folder / "recipe.yaml", [f"ppo.rewards=[{{function: my_rules:{fn}}}]"]), "ppo")[0]
        for folder, fn in ((first, "a"), (second, "b"))
    ]
    assert [r.fn("q", "r") for r in rules] == [1.0, 2.0]
    broken.mkdir()
    (broken / "my_rules.py").write_text("raise RuntimeError('no GPU here')\n")
    (broken / "recipe.yaml").write_text((first / "recipe.yaml").read_text())
    with pytest.raises(RecipeError, match=r"my_rules:a'?: importing its module raised RuntimeError: no GPU here"):
        load_rules(load_recipe(broken / "recipe.yaml", ["ppo.rewards=[{function: my_rules:a}]"]), "ppo")


def test_the_older_reward_keys_and_the_list_are_one_reward(tmp_path):
    legacy = load_recipe(TINY_RECIPE, ["ppo.reward_function=finetune.rl.rewards:exact_answer"])
    terms = [(k, t.function, t.weight) for k, t in legacy.ppo.reward_terms()]
    assert terms == [("reward_from", None, 1.0), ("reward_function", "finetune.rl.rewards:exact_answer", 1.0)]
    rules_only = load_recipe(TINY_RECIPE, ["ppo.rewards=[{function: finetune.rl.rewards:exact_answer}]"])
    assert rules_only.input_dir("ppo", "reward_from") is None  # no learned term: no reward adapter
    with pytest.raises(RecipeError, match="both rewards and reward_from, reward_function_weight are set"):
        load_recipe(
            TINY_RECIPE,
            ["ppo.rewards=[{model: null}]", "ppo.reward_from=none", "ppo.reward_function_weight=2"],
        )
    with pytest.raises(RecipeError, match="at most one learned reward"):
        load_recipe(TINY_RECIPE, ["ppo.rewards=[{model: null}, {model: runs/x/reward}]"])


def test_grpo_takes_the_same_list_and_its_older_keys_default_to_rules_only(tmp_path):
    from finetune.cli.azureml import stage_upstreams
    from finetune.core.lineage import upstream
    from finetune.rl.rules import learned_weight
    from finetune.rl.stage import resolve_start

    shipped = load_recipe(TINY_RECIPE)  # grpo.reward_function only: no learned reward unless asked (reward_from none)
    assert [(k, t.function) for k, t in shipped.grpo.reward_terms()] == [
        ("reward_function", "finetune.rl.rewards:exact_answer")
    ]
    assert shipped.input_dir("grpo", "reward_from") is None and learned_weight(shipped, "grpo") is None
    assert "reward" not in stage_upstreams(shipped, "grpo")
    rewards = "[{function: finetune.rl.rewards:numeric_answer, weight: 2}, {model: null, weight: 0.5}]"
    mixed = load_recipe(TINY_RECIPE, ["grpo.reward_function=null", f"grpo.rewards={rewards}"])
    assert [(k, t.label(), t.weight) for k, t in mixed.grpo.reward_terms()] == [
        ("rewards[0]", "numeric_answer", 2.0),
        ("rewards[1]", "learned", 0.5),
    ]
    # the learned entry is grpo's reward_from for every reader of a stage's inputs: the folder, Azure ML, lineage
    assert mixed.input_dir("grpo", "reward_from") == mixed.stage_dir("reward") and learned_weight(mixed, "grpo") == 0.5
    assert "reward" in stage_upstreams(mixed, "grpo") and upstream(mixed, "grpo")["reward_from"] == []  # not run yet
    older = load_recipe(TINY_RECIPE, ["grpo.reward_from=runs/x/reward"])
    assert [(k, t.model) for k, t in older.grpo.reward_terms()][0] == ("reward_from", "runs/x/reward")
    with pytest.raises(RecipeError, match="both rewards and reward_function are set"):
        load_recipe(TINY_RECIPE, [f"grpo.rewards={rewards}"])
    with pytest.raises(RecipeError, match="grpo has no reward"):  # before any earlier output is looked for
        resolve_start(load_recipe(TINY_RECIPE, ["grpo.reward_function=null", f"output_dir={tmp_path}"]), "grpo")


class _Tok:
    all_special_tokens = ["<|endoftext|>"]

    def get_added_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


def _score(rules, responses, stops, rows):
    """Run the scorer's rule part on token-id 'responses' (the fake tokenizer decodes ids as numbers)."""
    scorer = Scorer(SimpleNamespace(reward_head=None), rules, _Tok(), 0, True, 4, None, response_limit=4)
    resp = torch.tensor(responses)
    has_stop = torch.tensor(stops)
    mask = torch.tensor([[1] * len(r) for r in responses])
    return scorer(resp, mask, 0, resp, mask, has_stop, rows)


def test_terms_are_weighted_summed_and_logged_apart_and_declared_keywords_arrive(tmp_path):
    module = (
        "def seen(prompt, response, stopped, response_tokens, response_limit):\n"
        "    return float(stopped) + response_tokens / response_limit\n"
    )
    recipe = _recipe(
        "[{function: my_rules:seen, weight: 2}, {function: finetune.rl.rewards:numeric_answer, weight: 0.5}]",
        tmp_path,
        module,
    )
    rules = load_rules(recipe, "ppo")
    user = [{"role": "user", "content": "q"}]
    rows = [{"prompt": user, "example": {"answer": a}, "where": "f: row 1"} for a in (7, 8)]
    total, info = _score(rules, [[5, 7, 0], [5, 9, 0]], [True, False], rows)
    # row 1: stopped, 3 tokens; text "5 7" (the stop token is not part of the reply) -> numeric 1
    # row 2: not stopped, text "5 9 0" -> last number 0 != 8
    assert total.tolist() == pytest.approx([2 * (1 + 3 / 4) + 0.5, 2 * (3 / 4)])
    assert info["reward_seen"] == pytest.approx((1.75 + 0.75) / 2) and info["reward_numeric_answer"] == 0.5
    assert info["score_rule"] == pytest.approx(total.mean().item()) and info["time_reward_functions_s"] >= 0


@pytest.mark.parametrize(
    "body, what",
    [
        ("raise KeyError('gold')", r"raised KeyError: 'gold'"),
        ("return 'one'", r"returned str 'one', not a number"),
        ("return float('nan')", r"returned nan, not a finite number"),
        ("return None", r"returned NoneType None, not a number"),
    ],
)
def test_a_failing_rule_stops_with_the_function_the_row_and_the_response(tmp_path, body, what):
    recipe = _recipe("[{function: my_rules:bad}]", tmp_path, f"def bad(prompt, response):\n    {body}\n")
    rows = [{"prompt": [{"role": "user", "content": "q"}], "example": {}, "where": "data/x.jsonl: row 12"}]
    with pytest.raises(RewardFunctionError) as e:
        _score(load_rules(recipe, "ppo"), [[4, 2]], [False], rows)
    assert str(e.value).startswith("ppo.rewards[0]: reward function my_rules:bad ")
    assert re.search(what + r" on data/x.jsonl: row 12, response '4 2'", str(e.value))
