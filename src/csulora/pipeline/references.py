"""The references a correction reads beside the update, opened once and checked before any weight.

- a **subspace cache** (``csulora subspace``), or the **base/aligned pair** whose exact
  ``D = W_aligned - W_base`` is streamed module by module (subspaces then computed on the fly,
  through the cache's float32 round trip so both routes give identical corrections, §3);
- the **aligned model** alone (a full checkpoint's ``dW`` needs it; an adapter's calibration file
  is checked against it);
- a **calibration file** (``csulora calibrate``, §5c), checked against the model it must come
  from: ALIGNED when given, else the adapter's recorded ``base_model_name_or_path`` when that
  resolves to a local folder or a cached hub id;
- the **fine-tuned model's statistics** (``--update-statistics``, Antidote's: ``csulora calibrate
  ALIGNED --update UPDATE --pairs FILE``), checked against that same aligned model **and** against
  the update being corrected (its recorded fingerprint): another adapter's statistics have the
  right shapes and would be a silent wrong answer.

Each statistics file must be of its flag's role (``io/calibration_file.py``: ``aligned`` for
``--calibration``, ``update`` for ``--update-statistics``); the other is refused when opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from csulora.errors import InputError
from csulora.io.calibration_file import ROLE_ALIGNED, ROLE_UPDATE, CalibrationFile, load_calibration
from csulora.io.checkpoints import CheckpointReader, check_same_architecture, read_displacement, weight_name
from csulora.io.fingerprint import model_fingerprint, update_fingerprint
from csulora.io.subspace_cache import SubspaceCache, check_fingerprint, load_subspace_cache, round_trip
from csulora.linalg.subspace import SubspaceConfig, compute_subspace
from csulora.pipeline.options import SourcePaths, relative_inside
from csulora.types import ModuleCalibration, ModuleSubspace


@dataclass
class References:
    """The opened references (closed by the caller's ExitStack); any may be None."""

    cache: SubspaceCache | None = None
    base: CheckpointReader | None = None
    aligned: CheckpointReader | None = None
    calibration: CalibrationFile | None = None  # activation statistics (docs/design.md §5c)
    update_statistics: CalibrationFile | None = None  # the fine-tuned model's (Antidote, issue 22)

    @property
    def has_displacement(self) -> bool:
        return self.base is not None and self.aligned is not None

    @property
    def d_source(self) -> str:
        return "exact" if self.has_displacement else "rank-k"

    def describe(self, within: Path | None = None) -> dict[str, str | None]:
        """Where each reference came from, as given; one inside ``within`` (the output folder: tune's
        own statistics) relative to it, so an output never names its temporary staging path."""

        def named(path: Path | None) -> str | None:
            if path is None:
                return None
            inside = relative_inside(Path(path), within) if within is not None else None
            return inside.as_posix() if inside is not None else str(path)

        described = {
            "subspace": named(self.cache.path if self.cache else None),
            "base": named(self.base.folder if self.base else None),
            "aligned": named(self.aligned.folder if self.aligned else None),
        }
        if self.calibration is not None:  # only then: other methods' reports keep their bytes
            described["calibration"] = named(self.calibration.path)
        if self.update_statistics is not None:
            described["update_statistics"] = named(self.update_statistics.path)
        return described

    # --- per module ------------------------------------------------------------------------
    def displacement(self, module: str) -> Tensor | None:
        """The exact D of one module (float32), or None without the pair."""
        if not self.has_displacement:
            return None
        return read_displacement(self.base, self.aligned, module)  # type: ignore[arg-type]

    def subspace(self, module: str, D: Tensor | None, config: SubspaceConfig) -> ModuleSubspace | None:
        """The cached subspace (checked against D when both exist), or one computed from D."""
        if self.cache is not None:
            if D is not None:
                check_fingerprint(self.cache, module, D)
            return self.cache.get(module)
        if D is None:
            return None
        label = f"{self.aligned.folder}: {weight_name(module)}"  # type: ignore[union-attr]
        return round_trip(compute_subspace(D, config, name=label))

    def statistics(self, module: str) -> ModuleCalibration | None:
        return self.calibration.module(module) if self.calibration is not None else None

    def update_statistics_of(self, module: str) -> ModuleCalibration | None:
        return self.update_statistics.module(module) if self.update_statistics is not None else None

    # --- checks before any weight is read ---------------------------------------------------
    def check_modules(self, shapes: Mapping[str, tuple[int, int]], where: Callable[[str], str]) -> None:
        """Every target exists with the update's shape in each reference (headers and metadata only).

        ``where(module)`` names the update's file for the message.
        """
        names = list(shapes)
        if self.has_displacement:
            check_same_architecture(self.base, self.aligned, names)  # type: ignore[arg-type]
            for name in names:
                _check_shape(name, shapes[name], self.base.shape(weight_name(name)), where,  # type: ignore[union-attr]
                             f"{self.base.folder}: tensor {weight_name(name)}")  # type: ignore[union-attr]
        if self.cache is not None:
            for name in names:
                _check_shape(name, shapes[name], self.cache.entry(name).shape, where, f"{self.cache.path}: module {name}")
        for stats in (self.calibration, self.update_statistics):
            if stats is not None:
                stats.check_modules(dict(shapes), where(names[0]) if names else "")

    def check_calibration_model(self, model: Path | None) -> None:
        """The calibration file comes from ``model`` (its fingerprint, docs/design.md §5c)."""
        if self.calibration is None:
            return
        if model is None:
            raise InputError(
                f"{self.calibration.path}: cannot check which model these statistics come from: give --aligned "
                "ALIGNED (the model the adapter was trained on)"
            )
        self.calibration.check_model(model_fingerprint(model)["digest"], model)

    def check_update_statistics_source(self, update: Path, model: Path | None) -> None:
        """The fine-tuned model's statistics come from ``update`` on ``model`` (:func:`check_update_statistics`)."""
        if self.update_statistics is not None:
            check_update_statistics(self.update_statistics, update, model)


def check_update_statistics(stats: CalibrationFile, update: Path, model: Path | None) -> None:
    """An update-statistics file was measured on ``update`` (its fingerprint: weights, and the
    adapter's config or the checkpoint's tokenizer) fine-tuned from ``model`` (ALIGNED's
    fingerprint); one line otherwise. ``model`` None: it cannot be known, so it is refused."""
    if model is None:
        raise InputError(
            f"{stats.path}: cannot check which aligned model these statistics come from: give --aligned ALIGNED "
            "(the model the update was trained from)"
        )
    stats.check_model(model_fingerprint(model)["digest"], model)
    stats.check_update(update_fingerprint(update), update)


def _check_shape(name: str, expected: tuple[int, int], found, where: Callable[[str], str], other: str) -> None:
    if tuple(found) != tuple(expected):
        raise InputError(f"{where(name)}: module {name} updates a {list(expected)} weight but {other} has shape {list(found)}")


def open_references(stack: ExitStack, paths: SourcePaths, *, calibration_groups: int | None = None) -> References:
    """Open every reference given (memory maps and headers only; closed with ``stack``).

    ``calibration_groups``: how many groups' statistics the file keeps in memory at once
    (a full checkpoint's dense solve holds one, docs/design.md §5d).
    """
    refs = References()
    kwargs = {} if calibration_groups is None else {"groups_in_memory": calibration_groups}
    if paths.calibration is not None:
        refs.calibration = load_calibration(paths.calibration, **kwargs)
        stack.callback(refs.calibration.close)
        refs.calibration.check_role(ROLE_ALIGNED)
    if paths.update_statistics is not None:
        refs.update_statistics = load_calibration(paths.update_statistics, **kwargs)
        stack.callback(refs.update_statistics.close)
        refs.update_statistics.check_role(ROLE_UPDATE)
    if paths.subspace is not None:
        refs.cache = load_subspace_cache(paths.subspace)
        stack.callback(refs.cache.close)
    if paths.aligned is not None:
        refs.aligned = stack.enter_context(CheckpointReader(paths.aligned))
    if paths.base is not None:
        refs.base = stack.enter_context(CheckpointReader(paths.base))
    return refs
