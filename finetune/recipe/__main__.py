"""`python -m finetune.recipe` prints the recipe reference (docs/recipe_reference.md)."""

from .reference import reference_markdown

print(reference_markdown(), end="")
