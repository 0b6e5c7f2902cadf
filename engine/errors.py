"""Errors whose message is a sentence a biologist can act on.

The UI shows ``str(error)`` as it is; the CLI prints it and exits non-zero.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """An error caused by the user's input, with a message meant to be shown as is."""


class DataError(UserFacingError):
    """The data cannot be used as given: wrong format, corrupt, not counts, and so on.

    ``fix`` names a remedy the UI may offer as a button (e.g. ``"make_unique"``).
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class JobCancelled(Exception):
    """Raised inside a job when the user asked to cancel it."""
