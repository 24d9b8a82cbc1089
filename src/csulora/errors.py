"""User-facing errors.

Every problem caused by the user's input (a file, a tensor, an option) is raised as a
:class:`CsuloraError` whose message is one line naming the file and, where there is one,
the tensor. The CLI prints that line and exits non-zero; library users catch the class.
"""

from __future__ import annotations


class CsuloraError(Exception):
    """A problem with the user's input, reported as one line."""


class InputError(CsuloraError):
    """A file or tensor given by the user is missing, malformed or inconsistent."""


class OptionError(CsuloraError, ValueError):
    """An option is out of its allowed range; raised before any tensor is read."""


# Longest excerpt of a file's content (or of a library's message about it) an error quotes: a
# corrupt header's whole JSON (kilobytes) in a "one-line" message buries what went wrong.
EXCERPT_CHARS = 120


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``str(value)`` on one line, cut to ``limit`` characters (an ellipsis says it was cut).

    For values read from a user's file (a corrupt ``format`` field, a group name) and library
    messages that quote them, so an error names the problem without echoing the file.
    """
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
