"""The calibration statistics file: one ``.safetensors`` with each Gram group's S_h and S_t.

Two roles, one layout (``role`` in the metadata says which; a file without it is ``aligned``):

- ``aligned``: written by ``csulora calibrate ALIGNED --task`` (the collector runs the aligned
  model and builds each group's statistics with :func:`csulora.linalg.gram.calibration_moments`),
  read as ``--calibration FILE`` (the calibrated method, Safe Delta; docs/design.md §5c); sets
  ``harmful`` and ``task``;
- ``update``: written by ``csulora calibrate ALIGNED --update UPDATE --pairs FILE`` (the
  **fine-tuned** model on harmful prompts followed by harmful answers), read as
  ``--update-statistics FILE`` (Antidote, docs/peers.md); the set ``harmful`` only (there is no
  task pass: read back, ``ModuleCalibration.task`` is None). Its ``info`` also records the
  update (``info.update.fingerprint``, :func:`csulora.io.fingerprint.update_fingerprint`), which
  :meth:`CalibrationFile.check_update` compares.

A file given under the other role's flag is refused in one line (:meth:`CalibrationFile.check_role`).
Layout:

- tensors, per group ``G`` and set ``X`` of the role: ``G.X.matrix`` (n x n)
  for the dense form, or ``G.X.U`` (n x q) and ``G.X.L`` (q) for the spiked form; float32
  storage (the Grams come from float32 activations), float64 on read;
- metadata ``csulora`` (one JSON string; sorted keys, so the bytes are deterministic)::

    {"format": "csulora-calibration", "version": 1, "role": "aligned"|"update",
     "modules": {module name: group},
     "groups": {group: {"n": n,
                        "harmful": {"form": "dense"|"spiked", "rank": q, "tokens": N, "sigma2": s},
                        "task":    {...}}},          (role aligned only)
     "info": {...}}

  ``info`` is free for the collector; it should hold ``"model_fingerprint"`` (the record of
  :func:`csulora.io.fingerprint.model_fingerprint` of the aligned model, whose ``"digest"``
  :meth:`CalibrationFile.check_model` compares), and the targets, generation settings,
  dtype/device, prompt and task set hashes, token counts and seconds it took.

Modules that read one input tensor (q/k/v; gate/up) map to one group and share its tensors.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from csulora.errors import InputError, excerpt
from csulora.io.atomic import atomic_output_file, check_output_file
from csulora.io.checkpoints import PICKLED_SUFFIXES, natural_key, open_safetensors, read_tensor
from csulora.linalg.psd import gram_problem, spiked_problem
from csulora.types import ModuleCalibration, SecondMoment

CALIBRATION_FORMAT = "csulora-calibration"
CALIBRATION_VERSION = 1
METADATA_KEY = "csulora"
SETS = ("harmful", "task")
MODEL_FINGERPRINT_KEY = "model_fingerprint"  # info[...]: model_fingerprint(aligned) of io/fingerprint.py
UPDATE_KEY = "update"  # info[...] of an update-statistics file: {"fingerprint": update_fingerprint(UPDATE), ...}
ROLE_ALIGNED = "aligned"  # the aligned model's statistics: --calibration (calibrated, Safe Delta)
ROLE_UPDATE = "update"  # the fine-tuned model's statistics: --update-statistics (Antidote)
ROLE_SETS = {ROLE_ALIGNED: SETS, ROLE_UPDATE: ("harmful",)}
# What each role is, which flag reads it and which command writes it: the refusals name both.
ROLE_TEXT = {
    ROLE_ALIGNED: ("the aligned model's statistics", "--calibration", "csulora calibrate ALIGNED --task FILE"),
    ROLE_UPDATE: (
        "Antidote's statistics of the fine-tuned model", "--update-statistics",
        "csulora calibrate ALIGNED --update UPDATE --pairs FILE",
    ),
}  # fmt: skip
# Groups kept in memory after a read: the modules of one decoder layer (q/k/v, o, gate/up,
# down) come in name order k, o, q, v, ..., so four groups let q and v reuse k's read.
_GROUPS_IN_MEMORY = 4


@dataclass(frozen=True)
class MomentEntry:
    """What the metadata says about one stored second moment (no tensor data)."""

    form: str  # "dense" or "spiked"
    rank: int  # stored eigenpairs (n for dense)
    tokens: int
    sigma2: float


@dataclass(frozen=True)
class GroupEntry:
    name: str
    n: int
    harmful: MomentEntry
    task: MomentEntry | None  # None in an update-statistics file

    def moment(self, which: str) -> MomentEntry:
        entry = self.harmful if which == "harmful" else self.task
        assert entry is not None, f"group {self.name} stores no {which} set"
        return entry


# -- writing --------------------------------------------------------------------------------------
def save_calibration(
    path: str | Path,
    groups: Mapping[str, ModuleCalibration | tuple[SecondMoment, SecondMoment]],
    modules: Mapping[str, str],
    info: Mapping[str, Any],
    *,
    force: bool = False,
    role: str = ROLE_ALIGNED,
) -> Path:
    """Write the statistics file atomically (temp file beside ``path``, renamed at the end).

    ``groups``: group name -> its statistics, a :class:`ModuleCalibration` or a pair
    ``(harmful, task)`` of :class:`SecondMoment` (as built by ``csulora.linalg.gram``), each dense
    or spiked, with positive token counts and equal ``n``; for ``role`` ``update`` the task is
    None (the fine-tuned model's statistics hold the harmful set only). ``modules``: every module
    name the file serves -> its group. ``info``: JSON-serialisable provenance (see the
    module docstring; ``info["model_fingerprint"]`` lets corrections check the model).
    An existing file is refused unless ``force``. Same inputs, same bytes. Returns ``path``.
    Problems with the statistics are ValueError (a bug in the caller, not user input).
    """
    from safetensors.torch import save_file

    if role not in ROLE_SETS:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLE_SETS)}")
    out = check_output_file(path, force)  # a folder, or an existing file without force: InputError
    unknown = sorted({group for group in modules.values() if group not in groups})
    if unknown:
        raise ValueError(f"modules map to groups without statistics: {', '.join(unknown)}")
    if not modules:
        raise ValueError("a calibration file must serve at least one module")
    tensors: dict[str, Tensor] = {}
    groups_meta: dict[str, Any] = {}
    for name in sorted(groups, key=natural_key):
        harmful, task = _pair(name, groups[name], role)
        groups_meta[name] = {"n": harmful.n}
        for which, moment in (("harmful", harmful), ("task", task)):
            if moment is None:
                continue
            tensors.update(_moment_tensors(f"{name}.{which}", moment))
            groups_meta[name][which] = _moment_meta(f"{name}.{which}", moment)
    meta = {
        "format": CALIBRATION_FORMAT,
        "version": CALIBRATION_VERSION,
        "role": role,
        "modules": {name: modules[name] for name in sorted(modules, key=natural_key)},
        "groups": groups_meta,
        "info": dict(info),
    }
    # One metadata key only: safetensors serialises its metadata map in varying order.
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True, allow_nan=False)}
    with atomic_output_file(out) as tmp:
        save_file(dict(sorted(tensors.items())), str(tmp), metadata=metadata)
    return out


def _pair(
    name: str, stats: ModuleCalibration | tuple[SecondMoment, SecondMoment | None], role: str
) -> tuple[SecondMoment, SecondMoment | None]:
    harmful, task = (stats.harmful, stats.task) if isinstance(stats, ModuleCalibration) else stats
    if (task is not None) != ("task" in ROLE_SETS[role]):
        held = "need a task set" if task is None else "hold no task set"
        raise ValueError(f"group {name}: statistics of role {role!r} {held}")
    if task is not None and harmful.n != task.n:
        raise ValueError(f"group {name}: harmful n = {harmful.n} but task n = {task.n}")
    return harmful, task


def _moment_tensors(prefix: str, moment: SecondMoment) -> dict[str, Tensor]:
    def stored(t: Tensor) -> Tensor:
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{prefix}: statistics contain NaN or Inf (or overflow float32)")
        return t

    if moment.matrix is not None:
        if tuple(moment.matrix.shape) != (moment.n, moment.n):
            raise ValueError(f"{prefix}: matrix has shape {list(moment.matrix.shape)}, expected n = {moment.n}")
        return {f"{prefix}.matrix": stored(moment.matrix)}
    assert moment.U is not None and moment.L is not None
    if moment.U.ndim != 2 or moment.U.shape[0] != moment.n or tuple(moment.L.shape) != (moment.U.shape[1],):
        raise ValueError(f"{prefix}: U {list(moment.U.shape)} and L {list(moment.L.shape)} do not fit n = {moment.n}")
    return {f"{prefix}.U": stored(moment.U), f"{prefix}.L": stored(moment.L)}


def _moment_meta(prefix: str, moment: SecondMoment) -> dict[str, Any]:
    if moment.tokens <= 0:
        raise ValueError(f"{prefix}: accumulated over {moment.tokens} tokens")
    if not (math.isfinite(moment.sigma2) and moment.sigma2 >= 0.0):
        raise ValueError(f"{prefix}: sigma2 is {moment.sigma2}")
    return {
        "form": "dense" if moment.is_dense else "spiked",
        "rank": moment.rank,
        "tokens": int(moment.tokens),
        "sigma2": float(moment.sigma2),
    }


# -- reading --------------------------------------------------------------------------------------
@dataclass
class CalibrationFile:
    """An opened statistics file; :meth:`module` reads one module's group on demand.

    Headers and metadata are checked when opened; tensor data is read (and checked for
    NaN/Inf) the first time a group is asked for, and the last few groups are kept so the
    modules sharing a group read it once.
    """

    path: Path
    meta: dict[str, Any]
    modules: dict[str, str]  # module name -> group
    groups: dict[str, GroupEntry]
    _handle: Any = None
    _cache: OrderedDict[str, ModuleCalibration] = field(default_factory=OrderedDict)
    # Groups kept read; a full checkpoint's correction keeps one (docs/design.md §5d: its memory
    # bound allows one module's statistics, and a 7B group's two dense Grams are 268 MB).
    groups_in_memory: int = _GROUPS_IN_MEMORY

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.meta.get("info", {}))

    @property
    def role(self) -> str:
        """``aligned`` (``--calibration``) or ``update`` (``--update-statistics``); checked when opened."""
        return str(self.meta.get("role", ROLE_ALIGNED))

    def check_role(self, expected: str) -> None:
        """Refuse a file of the other role: one line naming the file, what it holds, which flag
        reads it and which command writes what this flag reads."""
        if self.role == expected:
            return
        held, held_flag, _held_command = ROLE_TEXT[self.role]
        wanted, flag, command = ROLE_TEXT[expected]
        raise InputError(
            f"{flag} {self.path}: it holds {held} (read by {held_flag}), not {wanted}; write those with `{command}`"
        )

    def __contains__(self, module: object) -> bool:
        return module in self.modules

    def group_of(self, module: str) -> str:
        try:
            return self.modules[module]
        except KeyError:
            raise InputError(
                f"{self.path}: no statistics for module {module} (recalibrate with the module in --targets)"
            ) from None

    def module(self, name: str) -> ModuleCalibration:
        """The statistics of module ``name`` (float64 tensors; shared by its group)."""
        group = self.group_of(name)
        cached = self._cache.get(group)
        if cached is None:
            # Make room first: the group read never sits beside groups_in_memory others.
            while self._cache and len(self._cache) >= self.groups_in_memory:
                self._cache.popitem(last=False)
            cached = self._read_group(self.groups[group])
            self._cache[group] = cached
        else:
            self._cache.move_to_end(group)
        return cached

    def _read_group(self, entry: GroupEntry) -> ModuleCalibration:
        if self._handle is None:
            self._handle = open_safetensors(self.path)
        moments = {which: self._read_moment(entry, which) for which in ROLE_SETS[self.role]}
        return ModuleCalibration(group=entry.name, harmful=moments["harmful"], task=moments.get("task"))

    def _read_moment(self, entry: GroupEntry, which: str) -> SecondMoment:
        meta = entry.moment(which)
        prefix = f"{entry.name}.{which}"

        def read(part: str) -> Tensor:
            return read_tensor(self._handle, self.path, f"{prefix}.{part}", dtype=torch.float64)

        if meta.form == "dense":
            matrix = read("matrix")
            self._check_psd(gram_problem(matrix), f"{prefix}.matrix", entry.name)
            return SecondMoment(n=entry.n, matrix=matrix, tokens=meta.tokens)
        U, L = read("U"), read("L")
        self._check_psd(spiked_problem(U, L, meta.sigma2), f"{prefix}.U/L", entry.name)
        return SecondMoment(n=entry.n, U=U, L=L, sigma2=meta.sigma2, tokens=meta.tokens)

    def _check_psd(self, problem: str | None, tensor: str, group: str) -> None:
        """A Gram is positive semi-definite; a damaged one would fail deep in the solve (docs/design.md §5c)."""
        if problem is None:
            return
        modules = sorted((m for m, g in self.modules.items() if g == group), key=natural_key)
        raise InputError(
            f"{self.path}: tensor {tensor} (statistics of {', '.join(modules)}) is not positive semi-definite "
            f"({problem}); the file is damaged: recalibrate with `csulora calibrate`"
        )

    def check_modules(self, shapes: Mapping[str, tuple[int, int]], source: str | Path) -> None:
        """Every module of ``shapes`` (name -> the (out, in) weight shape it updates, as in
        ``source``) has statistics, and for inputs of the adapter's size ``in``.

        One-line InputError naming this file and the first module that does not fit.
        """
        for name in sorted(shapes, key=natural_key):
            if name not in self.modules:
                raise InputError(
                    f"{self.path}: no statistics for module {name}, which {source} adapts "
                    "(recalibrate with every adapted module in --targets)"
                )
            n = self.groups[self.modules[name]].n
            if int(shapes[name][1]) != n:
                raise InputError(
                    f"{self.path}: statistics of module {name} are for inputs of size {n} but {source} "
                    f"updates a {list(shapes[name])} weight (statistics from another model?)"
                )

    def check_model(self, fingerprint_digest: str, aligned_path: str | Path) -> None:
        """Refuse statistics measured on another model than the aligned one given.

        ``fingerprint_digest``: ``model_fingerprint(aligned_path)["digest"]``.
        """
        recorded = self.info.get(MODEL_FINGERPRINT_KEY)
        digest = recorded.get("digest") if isinstance(recorded, Mapping) else None
        if not isinstance(digest, str):
            raise InputError(
                f"{self.path}: records no model fingerprint (info.{MODEL_FINGERPRINT_KEY}), so it cannot be "
                f"checked against {aligned_path}; recalibrate with `csulora calibrate`"
            )
        if digest != fingerprint_digest:
            raise InputError(
                f"{self.path}: statistics were measured on another model than {aligned_path} "
                "(weights, tokenizer or chat template differ); recalibrate on the aligned model"
            )

    def check_update(self, fingerprint: Mapping[str, Any], update_path: str | Path) -> None:
        """Refuse the fine-tuned model's statistics measured on another update than ``update_path``.

        ``fingerprint``: :func:`csulora.io.fingerprint.update_fingerprint` of ``update_path``; the
        file's ``info.update.fingerprint`` must have the same kind and digest (same weights, and for
        an adapter the same config; for a checkpoint the same tokenizer and chat template).
        """
        update = self.info.get(UPDATE_KEY)
        recorded = update.get("fingerprint") if isinstance(update, Mapping) else None
        if not isinstance(recorded, Mapping) or not isinstance(recorded.get("digest"), str):
            raise InputError(
                f"{self.path}: records no update fingerprint (info.{UPDATE_KEY}.fingerprint), so it cannot be checked "
                f"against {update_path}; rerun `{ROLE_TEXT[ROLE_UPDATE][2]}`"
            )
        if (recorded.get("kind"), recorded["digest"]) != (fingerprint.get("kind"), fingerprint.get("digest")):
            raise InputError(
                f"{self.path}: statistics were measured on another {recorded.get('kind', 'update')} than {update_path} "
                f"(weights or config differ); rerun `csulora calibrate ALIGNED --update {update_path} --pairs FILE`"
            )

    def close(self) -> None:
        self._handle = None
        self._cache.clear()


def load_calibration(path: str | Path, *, groups_in_memory: int = _GROUPS_IN_MEMORY) -> CalibrationFile:
    """Open a statistics file and check its metadata and tensor headers (no tensor data read).

    Refuses (one-line InputError naming the file, and the tensor where there is one): a
    missing path or a folder, a pickled file, a file that is not safetensors or is
    truncated, one without csulora calibration metadata or of another version, and
    metadata that disagrees with the tensors' shapes. NaN/Inf are found when a group's
    tensors are read (:meth:`CalibrationFile.module`).
    """
    file = Path(path)
    if not file.exists():
        raise InputError(f"{file}: no such calibration file")
    if file.is_dir():
        raise InputError(f"{file}: expected a calibration .safetensors file, got a folder")
    if file.suffix in PICKLED_SUFFIXES:
        raise InputError(
            f"{file}: pickled files are never loaded; csulora reads calibration statistics from the "
            ".safetensors file `csulora calibrate` writes"
        )
    handle = open_safetensors(file)
    raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise InputError(f"{file}: not a csulora calibration file (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: corrupt calibration metadata ({excerpt(exc)})") from None
    if not isinstance(meta, dict) or meta.get("format") != CALIBRATION_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"{file}: not a csulora calibration file (format {excerpt(repr(found))})")
    if meta.get("version") != CALIBRATION_VERSION:
        raise InputError(
            f"{file}: calibration file version {excerpt(repr(meta.get('version')))} is not supported "
            f"(expected {CALIBRATION_VERSION}); recalibrate with `csulora calibrate`"
        )
    role = meta.get("role", ROLE_ALIGNED)
    if role not in ROLE_SETS:
        raise InputError(f"{file}: unknown calibration file role {excerpt(repr(role))} (expected {' or '.join(ROLE_SETS)})")
    groups = {
        name: _group_entry(file, handle, name, info, ROLE_SETS[role]) for name, info in _mapping(file, meta, "groups").items()
    }
    modules = {str(k): v for k, v in _mapping(file, meta, "modules").items()}
    for module, group in modules.items():
        if not isinstance(group, str) or group not in groups:
            raise InputError(
                f"{file}: module {excerpt(module)} maps to group {excerpt(repr(group))}, which has no statistics"
            )
    if not modules:
        raise InputError(f"{file}: the calibration file serves no module")
    if not isinstance(meta.get("info", {}), dict):
        raise InputError(f"{file}: corrupt calibration metadata (info is not an object)")
    return CalibrationFile(
        path=file, meta=meta, modules=modules, groups=groups, _handle=handle, groups_in_memory=groups_in_memory
    )


def _mapping(file: Path, meta: dict[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key)
    if not isinstance(value, dict):
        raise InputError(f"{file}: corrupt calibration metadata ({key!r} is missing or not an object)")
    return value


def _group_entry(file: Path, handle: Any, name: str, info: Any, sets: tuple[str, ...]) -> GroupEntry:
    try:
        n = int(info["n"])
        moments = {which: _moment_entry(info[which]) for which in sets}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{file}: corrupt metadata for group {excerpt(name)} ({excerpt(repr(exc))})") from None
    entry = GroupEntry(name=name, n=n, harmful=moments["harmful"], task=moments.get("task"))
    keys = set(handle.keys())
    for which in sets:
        meta = entry.moment(which)
        expected = {"matrix": (n, n)} if meta.form == "dense" else {"U": (n, meta.rank), "L": (meta.rank,)}
        for part, shape in expected.items():
            tensor = f"{name}.{which}.{part}"
            if tensor not in keys:
                raise InputError(f"{file}: tensor {excerpt(tensor)} is missing")
            found = tuple(handle.get_slice(tensor).get_shape())
            if found != shape:
                raise InputError(f"{file}: tensor {tensor} has shape {list(found)} but the metadata says {list(shape)}")
    return entry


def _moment_entry(info: Mapping[str, Any]) -> MomentEntry:
    entry = MomentEntry(
        form=str(info["form"]), rank=int(info["rank"]), tokens=int(info["tokens"]), sigma2=float(info["sigma2"])
    )
    if entry.form not in ("dense", "spiked"):
        raise ValueError(f"form {entry.form!r}")
    if entry.tokens <= 0 or entry.rank < 0 or not (math.isfinite(entry.sigma2) and entry.sigma2 >= 0.0):
        raise ValueError(f"tokens {entry.tokens}, rank {entry.rank}, sigma2 {entry.sigma2}")
    return entry
