"""rl.scoring: what the sequence score sums. The learned reward (read where the reward model reads, normalised with
the first rollout's statistics, which then stay fixed) plus the weighted rule reward, which sees the prompt's last
user turn, the response as text and the data row. A tiny random Llama with a reward adapter built in code
(tests/rl/test_engine.py's helpers); the shipped tiny tokenizer turns token ids 16-25 into the digits 0-9."""

from __future__ import annotations

import pytest
import torch

from finetune.core.modeling import load_tokenizer
from finetune.recipe import load_recipe
from finetune.rl.rules import RuleReward
from finetune.rl.scoring import Scorer
from tests.conftest import TINY_RECIPE
from tests.rl.test_engine import LLAMA_TARGETS, PAD, make_model, save_reward_adapter, tiny_llama

DIGIT = 16  # the tiny tokenizer's id of "0"
PROMPT_WIDTH = 3


def scorer(model, tokenizer, rule=None, weight=1.0, normalize=True):
    """The scorer of `model` (its learned reward when it has a reward head) plus `rule` at `weight`: the one place
    these tests build it (a rules entry {function: ..., weight: ...} as finetune.rl.rules.load_rules makes it)."""
    rules = [RuleReward("ppo.rewards[1]", f"tests:{rule.__name__}", rule, weight, label=rule.__name__)] if rule else []
    return Scorer(model, rules, tokenizer, PAD, normalize, micro=2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_recipe(TINY_RECIPE))


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    """(the policy model sharing the base with a reward adapter, the reward model itself)."""
    folder = tmp_path_factory.mktemp("reward")
    reward_model = save_reward_adapter(tiny_llama, LLAMA_TARGETS, folder)
    return make_model(reward_folder=folder), reward_model


def batch(answers: list[str], seed: int = 0):
    """Prompts of PROMPT_WIDTH random tokens, each followed by its answer's digits: the arguments the engine passes."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(a) for a in answers)
    responses = torch.full((len(answers), width), PAD)
    resp_mask = torch.zeros(len(answers), width, dtype=torch.long)
    for i, a in enumerate(answers):
        responses[i, : len(a)] = torch.tensor([DIGIT + int(c) for c in a])
        resp_mask[i, : len(a)] = 1
    prompts = torch.randint(3, 16, (len(answers), PROMPT_WIDTH), generator=g)
    ids = torch.cat([prompts, responses], 1)
    mask = torch.cat([torch.ones_like(prompts), resp_mask], 1)
    has_stop = torch.zeros(len(answers), dtype=torch.bool)
    rows = [
        {"prompt": [{"role": "user", "content": f"what is {i} + {i}?"}], "example": {"answer": str(2 * i)}}
        for i in range(len(answers))
    ]
    return ids, mask, PROMPT_WIDTH, responses, resp_mask, has_stop, rows


def exact_answer(prompt: str, response: str, example: dict) -> float:
    return float(response == example["answer"])


def own_score(reward_model, ids, mask) -> torch.Tensor:
    """The reward model's score of each sequence, as transformers computes it (the last token that is not padding)."""
    with torch.no_grad():
        return reward_model(input_ids=ids, attention_mask=mask).logits[:, 0]


def test_the_score_is_the_normalised_learned_reward_plus_the_weighted_rule(reward, tokenizer):
    model, reward_model = reward
    args = batch(["0", "3", "4", "66"])  # rows 0 and 2 answered right
    total, info = scorer(model, tokenizer, exact_answer, weight=2.0)(*args)
    raw = own_score(reward_model, args[0], args[1])
    normalised = (raw - raw.mean()) / raw.std(unbiased=False)
    rule = torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(total, normalised + 2.0 * rule, atol=1e-4, rtol=1e-4)
    assert info["score"] == pytest.approx(total.mean().item(), abs=1e-6)
    assert info["reward_exact_answer"] == pytest.approx(0.5)  # each term's own mean, unweighted
    assert info["score_rule"] == pytest.approx(2.0 * 0.5)  # the rules' part of the score, weighted
    assert info["score_learned_raw"] == pytest.approx(raw.mean().item())


def test_the_normalisation_is_fixed_from_the_first_rollout(reward, tokenizer):
    model, reward_model = reward
    score = scorer(model, tokenizer)
    first = batch(["1", "2", "3", "4"], seed=0)
    score(*first)
    raw = own_score(reward_model, first[0], first[1])
    later = batch(["5", "6", "7", "8"], seed=1)
    total, _ = score(*later)
    expected = (own_score(reward_model, later[0], later[1]) - raw.mean()) / raw.std(unbiased=False)
    torch.testing.assert_close(total, expected, atol=1e-4, rtol=1e-4)


def test_without_normalisation_the_learned_score_is_the_reward_models_own(reward, tokenizer):
    model, reward_model = reward
    args = batch(["12", "3"])
    total, _ = scorer(model, tokenizer, normalize=False)(*args)
    torch.testing.assert_close(total, own_score(reward_model, args[0], args[1]), atol=1e-5, rtol=1e-5)


def test_a_rule_alone_is_the_score_and_sees_the_prompt_the_response_and_the_row(tokenizer):
    seen = []

    def rule(prompt, response, example):
        seen.append((prompt, response, example))
        return float(len(response))

    total, info = scorer(make_model(), tokenizer, rule, weight=0.5)(*batch(["42", "7"]))  # a model with no reward head
    assert total.tolist() == [1.0, 0.5]
    assert seen == [("what is 0 + 0?", "42", {"answer": "0"}), ("what is 1 + 1?", "7", {"answer": "2"})]
    assert "score_learned_raw" not in info and info["score"] == pytest.approx(0.75)
