"""Rule reward functions as the RL stages call them: loaded from the recipe's `rewards` list (a module beside
the recipe is importable), their signature checked once at load (before any model loads; `finetune
pipeline` checks them before its first stage), then called per response with the keywords they
declare. A call that raises or returns anything but a finite number stops the stage with one message
naming the function, the data row and the response. The shipped functions: finetune/rl/rewards.py."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe import Recipe, RecipeError
from finetune.recipe.sections import REWARD_EXTRAS, RewardTerm

# reward_<label> figures the stages log already: the learned term's, and GRPO's spread of the summed reward
TAKEN_LABELS = ("learned", "std")


class RewardFunctionError(UserError):
    """A rule reward function failed on a row (raised, or returned a non-number or a non-finite value)."""


@dataclass
class RuleReward:
    """A loaded rule function with how to call it: f(prompt, response[, example], **extras, **kwargs)."""

    key: str  # where the recipe names it, e.g. "ppo.rewards[1]"
    spec: str  # module:function
    fn: object
    weight: float
    kwargs: dict = field(default_factory=dict)
    takes_example: bool = True
    extras: tuple[str, ...] = ()  # keywords of REWARD_EXTRAS the function declares
    label: str = ""

    def __call__(self, prompt: str, response: str, example: dict, context: dict, where: str) -> float:
        args = (prompt, response, example) if self.takes_example else (prompt, response)
        extras = {k: context[k] for k in self.extras}
        try:
            value = self.fn(*args, **extras, **self.kwargs)
        except Exception as e:  # user code: any failure is reported with the row, never a bare traceback
            raise self.error(f"raised {type(e).__name__}: {e}", where, response) from e
        return self.check(value, where, response)

    def check(self, value, where: str, response: str) -> float:
        if isinstance(value, numbers.Real):  # int, float, bool, numpy floats
            number = float(value)
        elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d torch or numpy array
            number = float(value.item())
        else:
            raise self.error(f"returned {type(value).__name__} {value!r:.80}, not a number", where, response)
        if not math.isfinite(number):
            raise self.error(f"returned {number}, not a finite number", where, response)
        return number

    def error(self, what: str, where: str, response: str) -> RewardFunctionError:
        return RewardFunctionError(
            f"{self.key}: reward function {self.spec} {what} on {where}, response {response[:300]!r}; fix the "
            "function (it must return a finite number for every row) or the data row"
        )


def _module(module_name: str, beside: Path):
    """The module `module_name`: the .py file beside the recipe when there is one (this recipe's own, even when a
    module of that name was imported before in this process, from another recipe's folder), else an import."""
    local = beside / (module_name.replace(".", "/") + ".py")
    if not local.is_file():
        return importlib.import_module(module_name)
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == local.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(module_name, local)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import would: pickling and worker processes find it by name
    spec.loader.exec_module(module)
    return module


def _import(spec: str, key: str, recipe: Recipe):
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise RecipeError(
            f"{recipe.source}: {key}: {spec!r} must look like module:function (e.g. my_rewards:exact_match)"
        )
    if module_name == "finetune.rewards":  # moved with the rl package
        raise RecipeError(
            f"{recipe.source}: {key}: finetune.rewards moved to finetune.rl.rewards; write finetune.rl.rewards:{name}"
        )
    if str(recipe.base_dir) not in sys.path:
        sys.path.insert(0, str(recipe.base_dir))
    try:
        fn = getattr(_module(module_name, Path(recipe.base_dir)), name)
    except (ImportError, AttributeError) as e:
        raise RecipeError(
            f"{recipe.source}: {key}: cannot load {spec!r} ({e}); the module must be importable (installed, or a "
            ".py file beside the recipe)"
        ) from None
    except Exception as e:  # the module itself failed as it ran (a syntax error, an exception at import)
        raise RecipeError(
            f"{recipe.source}: {key}: cannot load {spec!r}: importing its module raised {type(e).__name__}: {e}; "
            "fix the module"
        ) from None
    if not callable(fn):
        raise RecipeError(f"{recipe.source}: {key}: {spec} is a {type(fn).__name__}, not a function")
    return fn


def load_rule(term: RewardTerm, key: str, recipe: Recipe) -> RuleReward:
    """Import `term.function` (a module beside the recipe is importable) and check, from its signature, that
    it can be called as f(prompt, response[, example]) with the keywords it declares and the recipe's kwargs."""
    fn = _import(term.function, key, recipe)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: call it with the three arguments
        return RuleReward(key, term.function, fn, term.weight, dict(term.kwargs), label=term.label())
    extras = tuple(k for k in REWARD_EXTRAS if k in signature.parameters)
    probe = {**{k: None for k in extras}, **term.kwargs}
    for takes_example, args in ((True, ("prompt", "response", {})), (False, ("prompt", "response"))):
        try:
            signature.bind(*args, **probe)
        except TypeError:
            continue
        return RuleReward(key, term.function, fn, term.weight, dict(term.kwargs), takes_example, extras, term.label())
    given = ", ".join([*extras, *term.kwargs]) or "no keywords"
    raise RecipeError(
        f"{recipe.source}: {key}: reward function {term.function}{signature} cannot be called as "
        f"f(prompt, response) or f(prompt, response, example) with {given}: a rule reward takes the prompt and "
        f"the response (and the data row) positionally, declares any of {', '.join(REWARD_EXTRAS)} by name, and "
        "takes the entry's kwargs"
    )


def load_rules(recipe: Recipe, stage: str) -> list[RuleReward]:
    """Every rule function of the stage's reward, loaded and checked (before any model loads)."""
    rules = [
        load_rule(term, f"{stage}.{key}", recipe)
        for key, term in recipe.section(stage).reward_terms()
        if term.function is not None
    ]
    labels = [r.label for r in rules]
    for r in rules:  # the same function twice (e.g. two tolerances), or a taken name: numbered in the logs
        if labels.count(r.label) > 1 or r.label in TAKEN_LABELS:
            r.label = f"{r.label}_{r.key.rpartition('[')[2].rstrip(']')}"
    return rules


def learned_weight(recipe: Recipe, stage: str) -> float | None:
    """The learned reward's weight in the stage's reward, or None when it has none."""
    return next((t.weight for _, t in recipe.section(stage).reward_terms() if t.function is None), None)
