"""Flags several commands share, defined once: where and in what precision models run, the output folder."""

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


def add_output_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``-o/--output OUTDIR``, the name every command uses; ``--out`` (eval, train and demo's old
    name) is still accepted so existing scripts keep working."""
    parser.add_argument(
        "-o", "--output", "--out", dest="output", metavar="OUTDIR", required=True,
        help=f"{what}; must not exist or be empty unless --force (--out: the old name, still accepted)",
    )  # fmt: skip


def add_framing_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--framing NAME|FILE.json``: the chat form prompts are given in (docs/design.md §7)."""
    parser.add_argument(
        "--framing", metavar="NAME|FILE.json", default=None,
        help=f"chat form of {what}: a shipped framing (plain: one user turn, the default; aoa: the identity-shift "
        "attack's 'absolutely obedient agent' system message) or a JSON framing file "
        '{"name", "system", "user_prefix", "user_suffix"}',
    )  # fmt: skip
