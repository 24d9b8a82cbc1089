"""``python -m benchmarks.correction``: the 7B-shaped correction speed and memory benchmark."""

from __future__ import annotations

import sys

from benchmarks.correction.cli import main

if __name__ == "__main__":
    sys.exit(main())
