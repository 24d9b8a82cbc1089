"""The registry of post-hoc correction methods: one dict built from method instances.

Each method carries its ``name`` (the ``--method`` value), ``pretty_name``, ``paper_url``
and ``config_cls`` (a frozen dataclass whose field names are the CLI flags with ``_`` for
``-``, whose ``metadata`` holds ``help`` and, for enumerations, ``choices``, and which
validates itself in ``__post_init__`` with OptionError). So ``--method`` choices, flag
help and docs come from one place.

How the API calls a method::

    method = get_method(name)                       # OptionError lists the choices
    config = make_config(method, options)           # or method.config_cls(**options);
                                                    # validates before any tensor is read
    method.check_sources(config, has_displacement=..., has_subspace=...)
    # needs_subspace(config) / needs_displacement(config) say what to stream;
    # pass ModuleInput(displacement=None) when the exact D is not streamed.
    results = list(method.correct(module_inputs, config))   # a stream; ModuleInput's
                                                    # factors float64, D float32
    summary = method.summary(results, config)       # global report fields ({} for most;
                                                    # Safe LoRA: pdst, safelora_threshold)

``correct`` may hold every module's (small) factors before yielding the first result
(Safe LoRA's number mode ranks all cosines), but reads each D once. Each result keeps the
input ``scale``; its ``update.rank`` may differ from the input's (CSULoRA exact: up to 2r,
+k with restore; RESTA: r + k), so the writer sets per-module ``rank_pattern`` and an
``alpha_pattern`` that keeps s. Reports carry every key of ``REPORT_KEYS`` (None where
one does not apply); Safe LoRA adds ``safelora_dist``. Fractions: ``rho_*`` of
``||dW||^2``; ``compress_energy_dropped`` of ``||X*||^2``; ``restore_energy_added`` is
``||beta D_k||^2 / ||dW||^2``; ``subspace_energy`` of ``||D||^2``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from csulora.errors import OptionError
from csulora.methods.base import CorrectionMethod, MethodConfig, flag_name

# name -> method instance. Each method's own file registers it (``register(Resta())`` at its end),
# and ``csulora/methods/__init__.py`` imports the method files, one line each, so the registry
# itself imports no method (PEFT's register_peft_method does the same).
METHODS: dict[str, CorrectionMethod] = {}


def register(method: CorrectionMethod) -> CorrectionMethod:
    """Add a method instance under its ``name`` (a second method of the same name is an error)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> CorrectionMethod:
    """The registered method called ``name``; OptionError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise OptionError(
            f"unknown --method {name!r}; choose one of {', '.join(METHODS)}"
        ) from None


def option_names(method: CorrectionMethod) -> tuple[str, ...]:
    """Field names of the method's config, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(method.config_cls))


def make_config(method: CorrectionMethod | str, options: Mapping[str, Any]) -> MethodConfig:
    """Build and validate a method's config from options given by the user.

    ``None`` values mean "not given" and leave the config's default (so one CLI flag can
    serve two methods with different defaults, e.g. ``--restore``). An option the method
    does not take raises OptionError naming the flag and the method's own flags.
    """
    if isinstance(method, str):
        method = get_method(method)
    accepted = option_names(method)
    given = {key: value for key, value in options.items() if value is not None}
    unknown = [key for key in given if key not in accepted]
    if unknown:
        own = ", ".join(flag_name(name) for name in accepted) or "none"
        raise OptionError(
            f"{flag_name(unknown[0])} does not apply to --method {method.name} (its options: {own})"
        )
    return method.config_cls(**given)


def tunable_methods() -> tuple[str, ...]:
    """Names of the methods ``csulora tune`` can sweep (those that describe a knob)."""
    return tuple(name for name, method in METHODS.items() if method.tuning is not None)
