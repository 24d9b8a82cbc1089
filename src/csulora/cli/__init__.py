"""The ``csulora`` command: a thin layer over the typed Python API.

Each group of subcommands lives in its own module exposing ``register(subparsers)``;
every handler returns an exit code. A :class:`~csulora.errors.CsuloraError` becomes one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from csulora.version import __version__
from csulora.errors import CsuloraError

# Tensors of 2 MB and more on transparent huge pages: torch then takes 512x fewer page
# faults to fill a fresh allocation (one 7B module's D is 180 MB; the faults were a fifth
# of Safe LoRA's time, docs/benchmarks.md). torch reads the variable once, at its first
# allocation, so it is set here, before any command imports torch; a user's setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Commands whose cost is a few large products with each module's D. Between them torch's
# OpenMP threads wait passively instead of spinning: on a busy machine a spinning thread
# burns a core while its partner is descheduled, and `csulora subspace` on two threads took
# 71 s of CPU spinning against 37 s waiting passively (docs/benchmarks.md). Read by the
# OpenMP runtime when torch loads, so set before the commands are imported.
PASSIVE_WAIT_COMMANDS = ("subspace", "audit", "correct")


def _prefer_passive_waits(argv: list[str]) -> None:
    if argv and argv[0] in PASSIVE_WAIT_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Modules that add subcommands, in the order their commands appear in --help.
COMMAND_MODULES = (
    "csulora.cli.correction",  # subspace, audit, correct
    "csulora.cli.calibration",  # calibrate
    "csulora.cli.tuning",      # tune
    "csulora.cli.evaluation",  # eval, train, demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csulora",
        description=(
            "Audit and correct a fine-tuned update of an aligned chat model -- a PEFT LoRA adapter or a fully "
            "fine-tuned checkpoint -- so the model refuses harmful requests again and keeps its task gains. "
            "The recommended path: `calibrate` the aligned model once per task (activation statistics), then "
            "`tune` (or `correct --method calibrated`), then `eval`. Every output is written atomically and "
            "never onto or inside an input; bad input is one line on stderr and exit code 2."
        ),
    )
    parser.add_argument("--version", action="version", version=f"csulora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command group not built yet
        module.register(subparsers)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every atomic writer removes its staging
    (their cleanup catches BaseException); Python's default SIGTERM kills the process on the spot
    and would leave a half-written ``.OUTDIR.tmp-*`` behind."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; an embedding caller keeps its own
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _prefer_passive_waits(argv)
    # Named before parsing: Ctrl-C may come while the parser imports torch.
    name = f"csulora {argv[0]}" if argv and not argv[0].startswith("-") else "csulora"
    try:
        with _sigterm_raises():
            args = build_parser().parse_args(argv)
            return int(args.handler(args) or 0)
    except CsuloraError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; no partial output is left behind", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated; no partial output is left behind", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
