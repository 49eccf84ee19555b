"""The recipe layer's error and the spellings every stage shares."""

from finetune.errors import UserError

NO_ADAPTER = "none"  # the one spelling of "no adapter" for start_from / reward_from


class RecipeError(UserError):
    """A recipe problem the user must fix; the message names file, key and fix."""
