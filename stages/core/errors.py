"""The one exception family that the CLI turns into a one-line message and a non-zero exit.

Everything a user can fix raises :class:`LangdmlError` (or a subclass); anything else is a bug and
keeps its traceback, a ``FileNotFoundError`` from our own code included.
"""

from __future__ import annotations


class LangdmlError(Exception):
    """A problem the user can fix (bad parameter, missing input, wrong layout); never a bug.

    The message is one line and says what is wrong and, where it can, what to do.
    """


class MissingInputError(LangdmlError, FileNotFoundError):
    """An input file a stage needs does not exist; the message names the stage that makes it."""


def one_line(err: BaseException) -> str:
    """The line a user sees: the message itself, or the last line of one re-raised from a DataLoader
    worker (which carries the worker's traceback before it)."""
    text = str(err).strip()
    if "\n" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters): what a library error says, briefly."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")[:200]
