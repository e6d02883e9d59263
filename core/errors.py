"""User-facing errors: the CLI prints their message on one line, never a traceback."""


class LorafitError(Exception):
    """A mistake in the user's input or environment, explained in one line."""
