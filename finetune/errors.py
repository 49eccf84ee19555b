"""The one base class of every error a user can fix: commands print its message, never a traceback."""


class UserError(ValueError):
    """A problem in the user's input (recipe, data, template, files); the message names where and the fix."""
