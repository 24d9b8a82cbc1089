"""What the pipeline checks before any tensor is read: targets, subspace options, sources.

One set of rules for both kinds of update (docs/design.md §5d, §10):

- **where D comes from**: ``--subspace FILE`` (a cache), or ``--base BASE`` with ``--aligned
  ALIGNED`` (the exact ``D = W_aligned - W_base`` streamed module by module);
- **ALIGNED** is required for a full checkpoint (it defines ``dW = W_ft - W_aligned``); for an
  adapter it may stand alone (the calibration file is then checked against it, and it is written
  as the output's ``base_model_name_or_path``);
- **a method** gets exactly what it needs with its options (``CorrectionMethod.check_sources``);
  statistics given to a method that reads none are refused rather than ignored;
- **the audit** needs a subspace or a base/aligned pair.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from csulora.errors import OptionError
from csulora.methods.base import CorrectionMethod, MethodConfig

PathLike = str | os.PathLike

ADAPTER = "adapter"
CHECKPOINT = "checkpoint"
NEEDS_ALIGNED = (
    "a full checkpoint's update is dW = W_ft - W_aligned: give --aligned ALIGNED (the model it was fine-tuned from)"
)
BASE_NEEDS_ALIGNED = "--base needs --aligned ALIGNED too: D = ALIGNED - BASE"


def relative_inside(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it lies inside it, else None."""
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None


@dataclass(frozen=True)
class SourcePaths:
    """The reference files given beside the update (any may be None)."""

    subspace: PathLike | None = None
    base: PathLike | None = None
    aligned: PathLike | None = None
    calibration: PathLike | None = None
    update_statistics: PathLike | None = None  # the fine-tuned model's statistics (Antidote)

    @property
    def has_displacement(self) -> bool:
        """The exact D is streamed: a base/aligned pair."""
        return self.base is not None and self.aligned is not None

    @property
    def has_subspace(self) -> bool:
        return self.has_displacement or self.subspace is not None


def check_sources(
    kind: str, paths: SourcePaths, method: tuple[CorrectionMethod, MethodConfig] | None = None
) -> None:
    """The one check of the references an audit or a correction reads, before any tensor.

    ``method`` None is the audit. A checkpoint's method must have a dense form.
    """
    if kind == CHECKPOINT and paths.aligned is None:
        raise OptionError(NEEDS_ALIGNED)
    if paths.base is not None and paths.aligned is None:
        raise OptionError(BASE_NEEDS_ALIGNED)
    if method is None:
        if not paths.has_subspace:
            raise OptionError("give --subspace FILE or --base BASE --aligned ALIGNED")
        return
    impl, config = method
    if kind == CHECKPOINT or not impl.has_factored_form:
        impl.check_dense_options(config)
    if kind == ADAPTER and not impl.has_factored_form and paths.aligned is None:
        raise OptionError(
            f"--method {impl.name} corrects the adapter's dense update s B A and writes the corrected model "
            "(or, with --lora-rank R, its best rank-R LoRA): give --aligned ALIGNED, the model the adapter was trained on"
        )
    if paths.calibration is not None and not impl.needs_calibration(config):
        raise OptionError(f"--calibration does not apply to --method {impl.name} (it reads no activation statistics)")
    if paths.update_statistics is not None and not impl.needs_update_statistics(config):
        raise OptionError(f"--update-statistics does not apply to --method {impl.name} (it reads none)")
    impl.check_sources(
        config,
        has_displacement=paths.has_displacement,
        has_subspace=paths.has_subspace,
        has_calibration=paths.calibration is not None,
        has_update_statistics=paths.update_statistics is not None,
    )
