"""Post-hoc correction methods behind one interface (base.py) and one registry (registry.py).

The registry names are loaded lazily (PEP 562): the method modules import
``csulora.audit``, which imports the data types of ``csulora.methods.base``; loading the
registry eagerly here would make that a circular import.
"""

from __future__ import annotations

from typing import Any

from csulora.methods.base import (
    REPORT_KEYS,
    CorrectionMethod,
    LoraUpdate,
    MethodConfig,
    ModuleInput,
    ModuleResult,
    ModuleSubspace,
)

_REGISTRY_NAMES = ("METHODS", "get_method", "make_config", "option_names")

__all__ = [
    "METHODS",
    "REPORT_KEYS",
    "CorrectionMethod",
    "LoraUpdate",
    "MethodConfig",
    "ModuleInput",
    "ModuleResult",
    "ModuleSubspace",
    "get_method",
    "make_config",
    "option_names",
]


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        from csulora.methods import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'csulora.methods' has no attribute {name!r}")
