"""The recipe layer: what a user asks for, checked before anything heavy runs.

- `sections`: every key of every section, with its type, default and meaning.
- `stages`: the stage registry (each stage declared once).
- `schema`: the whole recipe (shared sections + one per registered stage) and its path rules.
- `trl_fields`: the TRL / transformers config fields a stage section also takes.
- `overrides`: dotted `key=value` overrides.
- `loading`: read + override + validate; `reference`: the generated docs/recipe_reference.md.
"""

from .errors import NO_ADAPTER, RecipeError
from .loading import dump_recipe, load_recipe, resolved_dict, validate_recipe
from .overrides import apply_overrides, parse_overrides
from .reference import reference_markdown
from .schema import Recipe, recipe_model
from .sections import BUILTIN_PREFIX, DataSection, DataSource, GrpoAlgorithm, PpoAlgorithm
from .stages import STAGES, Stage

__all__ = [
    "BUILTIN_PREFIX",
    "NO_ADAPTER",
    "STAGES",
    "DataSection",
    "DataSource",
    "GrpoAlgorithm",
    "PpoAlgorithm",
    "Recipe",
    "RecipeError",
    "Stage",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_overrides",
    "recipe_model",
    "reference_markdown",
    "resolved_dict",
    "validate_recipe",
]
