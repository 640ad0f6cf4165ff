"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class LangdmlError(Exception):
    """A problem the user can fix (bad parameter, missing input, wrong layout); never a bug.

    The message is one line and says what is wrong and, where it can, what to do.
    """
