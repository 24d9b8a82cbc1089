"""Post-hoc correction methods behind one interface (base.py) and one registry (registry.py).

Each method is one module here; ``registry.METHODS`` maps ``--method`` names to instances.
The value types they work on live in :mod:`csulora.types`.
"""

from __future__ import annotations

from csulora.methods.base import CorrectionMethod, MethodConfig, Tuning
from csulora.methods.registry import METHODS, get_method, make_config, option_names, register, tunable_methods

__all__ = [
    "METHODS",
    "CorrectionMethod",
    "MethodConfig",
    "Tuning",
    "get_method",
    "make_config",
    "option_names",
    "register",
    "tunable_methods",
]
