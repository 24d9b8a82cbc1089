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
