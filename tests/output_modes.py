"""Output modes under a given umask: the fixture and the assertion every output test shares.

Outputs must get what a plain ``open``/``mkdir`` gives (files ``0666 & ~umask``, folders
``0777 & ~umask``), never the private modes of temporary files (io/atomic.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run the test under each umask (022: the usual; 077: private); yields the umask."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def modes_under(path: str | os.PathLike) -> dict[str, int]:
    """``{relative path: permission bits}`` of ``path`` and everything under it."""
    root = Path(path)
    found = {".": root.stat().st_mode & 0o777}
    if root.is_dir():
        for child in sorted(root.rglob("*")):
            found[str(child.relative_to(root))] = child.stat().st_mode & 0o777
    return found


def assert_usual_modes(path: str | os.PathLike, umask: int) -> None:
    """Files ``0666 & ~umask``, folders ``0777 & ~umask``: ``path`` and everything under it."""
    root = Path(path)
    found = modes_under(root)
    expected = {rel: (0o777 if (root / rel).is_dir() else 0o666) & ~umask for rel in found}
    assert {k: oct(v) for k, v in found.items()} == {k: oct(v) for k, v in expected.items()}
