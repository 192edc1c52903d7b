"""The one exception type the CLI turns into a single line and a nonzero exit."""


class UserError(Exception):
    """Bad input or an unsupported request, explained in one line for the user."""
