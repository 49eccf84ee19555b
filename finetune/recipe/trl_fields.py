"""Training fields a recipe takes from TRL / transformers config dataclasses, checked before any model loads.

A stage section (and the shared `training` block) accepts any field of the stage's TRL config
(SFTConfig, RewardConfig, DPOConfig; TrainingArguments for `training`), so users keep the vocabulary
they know. These functions check names and value types against those dataclasses; `coerce_numbers`
turns YAML strings such as "5e-6" into the numbers the fields expect.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from .errors import RecipeError

# Keys of the TRL / transformers training configs that the recipe owns elsewhere: setting them in a
# training block would create a second source of truth, so it is an error naming the right place.
OWNED_ELSEWHERE = {
    "output_dir": "output_dir (top level)",
    "seed": "seed (top level)",
    "data_seed": "seed (top level)",
    "fp16": "precision (top level)",
    "bf16": "precision (top level)",
    "half_precision_backend": "precision (top level)",
    "deepspeed": "deepspeed (top level)",
    "logging_steps": "logging.logging_steps",
    "report_to": "logging.report_to",
    "resume_from_checkpoint": "<stage>.resume",
    "training": "the stage section itself (TRL fields go directly under it, e.g. sft.max_steps)",
    "chat_template_path": "template.name",
    "assistant_only_loss": "the chat template (assistant-only loss is always on)",
    "completion_only_loss": "the chat template (assistant-only loss is always on)",
    "dataset_text_field": "<stage>.data",
    "eos_token": "template.name (the template's end-of-turn token)",
    "pad_token": "the tokenizer (pad is set by finetune)",
    "model_init_kwargs": "model",
    "eval_strategy": "nothing (finetune evaluates the held-out set itself before and after training)",
    "ref_model_init_kwargs": "model",
    "model_adapter_name": "<stage>.start_from",
    "ref_adapter_name": "<stage>.start_from (the reference is the start model, adapters disabled)",
}


# finetune's defaults over the TRL configs' for every stage (a recipe value wins; a stage's own defaults are in
# its registry entry, finetune.recipe.stages). TRL turns gradient checkpointing on by default; it re-runs each
# forward in the backward pass (about a third more compute) and only pays when activations do not fit, so here
# it is off unless a recipe asks for it (docs/benchmarks.md, "Gradient checkpointing: off unless a recipe asks").
# transformers 5 renamed it activation_checkpointing (the old name still works, with a FutureWarning).
# disable_tqdm: the Trainer's bar and raw log dictionaries give way to StepLog (one log style, every stage).
TRL_DEFAULTS = {"activation_checkpointing": False, "disable_tqdm": True}
RENAMED = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def nearest(key: str, candidates) -> str:
    """'; did you mean ...?' for the closest valid key, or the list of valid keys when it is short."""
    candidates = [c for c in candidates if c != "source"]
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{match[0]}'?"
    return f"; valid keys: {', '.join(candidates)}" if len(candidates) <= 12 else ""


def type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _type_ok(tp, value) -> bool:
    """Loose structural check of a YAML value against a dataclass field annotation."""
    if tp is Any or tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            # `SchedulerType | str` and the like: the str is for typing, the values are the enum's
            return any(_type_ok(e, value) for e in enums)
        return any(_type_ok(a, value) for a in args)
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if origin in (list, tuple, set):
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if not isinstance(tp, type):
        return True
    if issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in tp.__members__
    checks = {
        bool: lambda v: isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        tuple: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }
    return checks.get(tp, lambda v: True)(value)


def _fields(config_cls) -> dict:
    return {f.name: f for f in dataclasses.fields(config_cls) if f.init}


def coerce_numbers(block: dict, config_cls) -> dict:
    """A copy of `block` with numbers written as strings (YAML reads 5e-6 as a string) turned into the
    int / float their field expects; ints only when whole. Anything else is left for the check."""
    fields, out = _fields(config_cls), dict(block)
    for key, value in block.items():
        field = fields.get(key)
        if field is None or not isinstance(value, str) or field.type not in (float, int):
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if field.type is float or number.is_integer():
            out[key] = field.type(number)
    return out


def check_training_block(
    block: dict, config_cls, where: str, source: str, own_keys=(), ranges: dict[str, Range] | None = None
) -> None:
    """Raise RecipeError for a key that is not a field of `config_cls` (or is owned elsewhere in the
    recipe), or a value of the wrong type; the message names file, key and the nearest valid key."""
    fields = _fields(config_cls)
    for key, value in block.items():
        if key in OWNED_ELSEWHERE:
            raise RecipeError(f"{source}: {where}.{key}: set this with {OWNED_ELSEWHERE[key]} instead")
        if key not in fields:
            raise RecipeError(
                f"{source}: {where}.{key}: unknown key (neither a finetune key nor a {config_cls.__name__} field)"
                f"{nearest(key, [*own_keys, *fields])}"
            )
        if not _type_ok(fields[key].type, value):
            choices = [
                m.value
                for a in typing.get_args(fields[key].type)
                if isinstance(a, type) and issubclass(a, enum.Enum)
                for m in a
            ]
            expected = f"one of {choices}" if choices else type_name(fields[key].type)
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise RecipeError(
                f"{source}: {where}.{key}: expected {expected}, got {type(value).__name__} {value!r}"
                + (f"; did you mean '{close[0]}'?" if close else "")
            )
    check_ranges(block, where, source, ranges)


# A value range: (test, what the value must be, why), checked when the recipe loads.
Range = tuple[Callable[[Any], bool], str, str]


def positive(v) -> bool:
    return v > 0  # False for NaN too


def _at_least(n):
    return lambda v: v >= n


def _fraction(v) -> bool:
    return 0 <= v < 1


def _steps(v) -> bool:
    return v == -1 or v > 0


# Ranges of the TRL / transformers fields every stage shares, checked when the recipe loads: the dataclasses
# accept e.g. a negative learning rate or batch size, and the trainer finds out (or trains nothing) only after
# the model has loaded. A field whose meaning depends on the stage (beta) has its range in the stage's registry
# entry.
RANGES: dict[str, Range] = {
    "learning_rate": (positive, "a number > 0", "0 or less trains nothing or trains backwards"),
    "per_device_train_batch_size": (_at_least(1), "an integer >= 1", ""),
    "per_device_eval_batch_size": (_at_least(1), "an integer >= 1", ""),
    "gradient_accumulation_steps": (_at_least(1), "an integer >= 1", ""),
    "num_train_epochs": (positive, "a number > 0", "0 epochs trains nothing"),
    "max_steps": (_steps, "-1 (train num_train_epochs) or an integer > 0", "0 steps trains nothing"),
    "warmup_steps": (_at_least(0), "a number >= 0", ""),
    "warmup_ratio": (_fraction, "a fraction in [0, 1)", ""),
    "weight_decay": (_at_least(0), "a number >= 0", ""),
    "max_grad_norm": (_at_least(0), "a number >= 0 (0 turns clipping off)", ""),
    "adam_beta1": (_fraction, "a fraction in [0, 1)", ""),
    "adam_beta2": (_fraction, "a fraction in [0, 1)", ""),
    "adam_epsilon": (positive, "a number > 0", ""),
    "save_steps": (positive, "a number > 0", ""),
    "save_total_limit": (_at_least(1), "an integer >= 1 (or null: keep all)", "0 would keep no checkpoint"),
    "eval_steps": (positive, "a number > 0", ""),
    "max_length": (_at_least(1), "an integer >= 1", ""),
    "max_prompt_length": (_at_least(1), "an integer >= 1", ""),
    "dataloader_num_workers": (_at_least(0), "an integer >= 0", ""),
}


def check_ranges(block: dict, where: str, source: str, ranges: dict[str, Range] | None = None) -> None:
    """Raise RecipeError for a value out of its field's range (RANGES, then the stage's own `ranges`), naming
    file, key and the range."""
    rules = {**RANGES, **(ranges or {})}
    for key, value in block.items():
        rule = rules.get(key)
        if rule is not None and value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
            test, must, why = rule
            if not test(value):
                raise RecipeError(
                    f"{source}: {where}.{key}: must be {must}, got {value!r}" + (f" ({why})" if why else "")
                )
        if isinstance(value, float) and not math.isfinite(value):  # every number, whatever its field
            raise RecipeError(f"{source}: {where}.{key}: must be a finite number, got {value!r}")


def config_class(spec: tuple[str, str]):
    """The TRL config class a stage names as (module, class). A stage may take its trainer from
    trl.experimental (ORPO): that it is experimental is said in the stage's docs, not in a warning at every
    recipe load."""
    import importlib
    import warnings

    module, name = spec
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        return getattr(importlib.import_module(module), name)
