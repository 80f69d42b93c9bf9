"""User-facing errors: each names the problem and the fix.

The CLI prints an :class:`LmpressError` as one line (no traceback); anything else is a bug.
"""


class LmpressError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class InputError(LmpressError, ValueError):
    """Bad input: a missing file, a corrupt checkpoint, an unsupported architecture or option."""
