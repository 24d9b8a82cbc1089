"""Flags several commands share, defined once: where and in what precision models run."""

from __future__ import annotations

import argparse
from typing import Any

from csulora.io.modeling import DEVICE_CHOICES, DTYPES


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (default: CUDA when present, else CPU; float32)."""
    group = parser.add_argument_group("where models run")
    group.add_argument(
        "--device", choices=DEVICE_CHOICES, default=None,
        help="cpu or cuda (default: cuda when present, else cpu)",
    )  # fmt: skip
    group.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None,
        help="model precision (default float32: exact reruns; bfloat16 halves memory on GPUs)",
    )  # fmt: skip


def device_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``device=``/``dtype=`` keyword arguments of the API functions, from the flags."""
    return {"device": args.device, "dtype": args.dtype}
