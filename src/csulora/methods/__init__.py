"""Post-hoc correction methods behind one interface (base.py) and one registry (registry.py).

Each method is one file here that registers itself (``register(Method())`` at its end); the
imports below load them, one line a method, in the order ``--method`` lists them. Shared helpers
live in ``common.py``; the value types they work on in :mod:`csulora.types`. Adding a method is
its file plus one line here (docs/design.md §9).
"""

from __future__ import annotations

from csulora.methods import csulora, safelora, scale, resta, calibrated, safedelta, antidote  # noqa: F401 - each registers itself
from csulora.methods.base import CorrectionMethod, MethodConfig, Preset, Tuning
from csulora.methods.registry import METHODS, get_method, make_config, option_names, register, tunable_methods

__all__ = [
    "METHODS",
    "CorrectionMethod",
    "MethodConfig",
    "Preset",
    "Tuning",
    "get_method",
    "make_config",
    "option_names",
    "register",
    "tunable_methods",
]
