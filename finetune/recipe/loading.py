"""Read a recipe file, apply overrides, validate everything before any model loads."""

from __future__ import annotations

import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from finetune.readers import load_yaml, read_json, read_text, read_yaml

from .errors import RecipeError
from .overrides import apply_overrides
from .schema import Recipe, recipe_model
from .stages import STAGES
from .trl_fields import check_training_block, coerce_numbers, config_class, nearest


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError before anything heavy happens."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found (give a path such as recipes/tiny_chat.yaml)")
    raw = load_yaml(read_text(path, RecipeError, "the recipe"), str(path), RecipeError) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return validate_recipe(apply_overrides(raw, overrides or []), source=str(path))


def validate_recipe(raw: dict, source: str = "<memory>") -> Recipe:
    if "source" in raw:
        raise RecipeError(f"{source}: source: unknown key")
    model = recipe_model()
    try:
        recipe = model.model_validate({**raw, "source": source})
    except ValidationError as e:
        raise RecipeError(_format_pydantic_error(e, source, model)) from None
    from transformers import TrainingArguments

    recipe.training = coerce_numbers(recipe.training, TrainingArguments)
    check_training_block(recipe.training, TrainingArguments, "training", source)
    for stage in STAGES:
        section = recipe.section(stage.name)
        if section is None or stage.trl_config is None:
            continue
        config_cls = config_class(stage.trl_config)
        extra = coerce_numbers(section.model_extra or {}, config_cls)
        check_training_block(
            extra, config_cls, stage.name, source, own_keys=type(section).model_fields, ranges=stage.ranges
        )
        section.model_extra.update(extra)
    for key, value, read in (
        ("deepspeed", recipe.deepspeed, read_json),
        ("launch.accelerate_config", recipe.launch.accelerate_config, read_yaml),
    ):
        path = recipe.resolve_path(value)
        if path is None:
            continue
        if not Path(path).is_file():
            raise RecipeError(f"{source}: {key}: file not found: {path} (paths are relative to the recipe file)")
        try:  # the libraries read these files later, silently keeping the last of two equal keys
            config = read(path, RecipeError)
        except RecipeError as e:
            raise RecipeError(f"{source}: {key}: {e}") from None
        if not isinstance(config, dict):
            raise RecipeError(f"{source}: {key}: {path} holds a {type(config).__name__}, not a mapping of settings")
    return recipe


def resolved_dict(recipe: Recipe) -> dict:
    """The fully resolved recipe (defaults filled in) as plain data."""
    return recipe.model_dump(mode="json", exclude={"source"})


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(resolved_dict(recipe), sort_keys=False)


def _format_pydantic_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        path = ".".join(loc) or "<top>"
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, e["loc"][:-1])
            hint = nearest(loc[-1], parent.model_fields) if parent else ""
            lines.append(f"{source}: {path}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {path}: required key is missing")
        else:
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {path}: {message} (got {e.get('input')!r})")
    return "\n".join(lines)


def _model_at(model, loc):
    """The pydantic section class at a key path, for suggesting valid keys."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        for arg in list(candidates):
            candidates.extend(typing.get_args(arg))
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model
