"""The reports of `audit` and `correct`: per-module rows, summaries, JSON and text tables.

:func:`csulora.pipeline.api.audit_adapter` returns an :class:`AuditReport` and
:func:`csulora.pipeline.api.correct_adapter` a :class:`CorrectionReport`; both print as a plain
table (one row per module, ``-`` where a value does not apply) and serialise to JSON
(strict: NaN is refused, keys sorted, written atomically).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from csulora.io.atomic import atomic_output_file

PathLike = str | os.PathLike


# -- report classes ----------------------------------------------------------------------------------
class _ModuleReport:
    """What both reports share: JSON output and a per-module table (columns per subclass)."""

    adapter: str
    d_source: str | None
    sources: dict[str, str | None]
    modules: list[dict[str, Any]]
    summary: dict[str, Any]
    untargeted: list[dict[str, Any]] | None

    def _columns(self) -> tuple[tuple[str, str, str], ...]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _report_dict(self, kind: str, **own: Any) -> dict[str, Any]:
        """``kind``, then the report's ``own`` keys, then the keys both reports carry."""
        data = {
            "kind": kind,
            **own,
            "adapter": self.adapter,
            "d_source": self.d_source,
            "sources": self.sources,
            "summary": self.summary,
            "modules": self.modules,
        }
        return with_untargeted(data, self.untargeted)

    def to_json(self, path: PathLike | None = None) -> str:
        """The report as JSON text; also written (atomically) to ``path`` when given."""
        return dump_json(self.to_dict(), path)

    def format_table(self) -> str:
        table = format_module_table(self.modules, self._columns())
        untargeted = getattr(self, "untargeted", None)
        if untargeted:  # a full checkpoint's other tensors (docs/design.md §5d)
            table += "\n\n" + format_untargeted_table(untargeted)
        return table + "\n" + _format_summary(self.summary)


@dataclass
class AuditReport(_ModuleReport):
    """Per-module audit rows (``module`` plus the keys of :func:`csulora.linalg.geometry.audit_module`)."""

    adapter: str
    d_source: str | None  # "exact" (streamed D) or "rank-k" (subspace cache only)
    sources: dict[str, str | None]
    modules: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    # A full checkpoint's tensors outside the targets (docs/design.md §5d); None for an adapter.
    untargeted: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return self._report_dict("audit")

    def _columns(self) -> tuple[tuple[str, str, str], ...]:
        return AUDIT_COLUMNS


@dataclass
class CorrectionReport(_ModuleReport):
    """What :func:`correct_adapter` did, per module (``module`` plus the method's report keys)."""

    method: str
    options: dict[str, Any]
    adapter: str
    out_dir: str
    report_path: str
    d_source: str | None
    sources: dict[str, str | None]
    modules: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    untargeted: list[dict[str, Any]] | None = None  # as in AuditReport
    # The method's own per-module columns (``CorrectionMethod.report_columns``), after the common ones.
    columns: tuple[tuple[str, str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        # out_dir/report_path are left out on purpose: the file is the same wherever it lands.
        return self._report_dict("correction", method=self.method, options=self.options)

    def _columns(self) -> tuple[tuple[str, str, str], ...]:
        return CORRECTION_COLUMNS + tuple(self.columns)


def with_untargeted(data: dict[str, Any], untargeted: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A checkpoint's report says so (``input: checkpoint``) and lists its untargeted tensors;
    an adapter's report keeps exactly its keys."""
    if untargeted is None:
        return data
    return {**data, "input": "checkpoint", "untargeted": untargeted}


def format_untargeted_table(rows: Sequence[dict[str, Any]]) -> str:
    """The untargeted tensors of a checkpoint: relative change from the aligned model."""
    columns = (("rel_change", "|W_ft - W_al|/|W_al|", ".3g"), ("changed", "changed", ""), ("written_from", "written from", ""))
    return format_module_table(rows, columns, key="tensor")


# (report key, column title, format)
AUDIT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("dw_norm", "|dW|", ".3g"),
    ("rho_F", "rho_F", ".3f"),
    ("rho_P", "rho_P", ".3f"),
    ("rho_O", "rho_O", ".3f"),
    ("safelora_cos", "cos_SL", ".4f"),
    ("cos_dW_D", "cos(dW,D)", ".4f"),
    ("dw_over_d", "|dW|/|D|", ".3g"),
    ("subspace_rank", "k", "d"),
    ("subspace_energy", "energy", ".3f"),
)
# What every correction reports; each method adds its own columns (CorrectionMethod.report_columns).
CORRECTION_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rho_F", "rho_F", ".3f"),
    ("rho_P", "rho_P", ".3f"),
    ("rho_O", "rho_O", ".3f"),
    ("dw_norm_before", "|dW|", ".3g"),
    ("dw_norm_after", "|X|", ".3g"),
    ("rank_in", "r", "d"),
    ("rank_out", "r'", "d"),
)


def format_module_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], *, key: str = "module"
) -> str:
    """A plain-text table, one row per ``row[key]`` (a module), ``-`` where a value does not apply."""
    header = [key] + [title for _, title, _ in columns]
    body = [[row[key]] + [_format_cell(row.get(name), fmt) for name, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line))

    return "\n".join(render(line) for line in [header, *body])


def _format_cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def _format_summary(summary: dict[str, Any]) -> str:
    parts = []
    for key, value in summary.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif not isinstance(value, dict | list):
            parts.append(f"{key}={value}")
    return "summary: " + ", ".join(parts)


def dump_json(data: dict[str, Any], path: PathLike | None) -> str:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if path is not None:
        with atomic_output_file(path) as tmp:
            tmp.write_text(text)
    return text


# -- summaries -----------------------------------------------------------------------------------
def weighted_rho(rows: Sequence[dict[str, Any]], norm_key: str) -> dict[str, float | None]:
    """Adapter-wide rho_F/P/O: each module's parts weighted by its ||dW||^2."""
    total = sum((row.get(norm_key) or 0.0) ** 2 for row in rows if row.get("rho_F") is not None)
    out: dict[str, float | None] = {}
    for key in ("rho_F", "rho_P", "rho_O"):
        if total > 0.0:
            out[key] = sum((row.get(norm_key) or 0.0) ** 2 * row[key] for row in rows if row.get(key) is not None) / total
        else:
            out[key] = None
    return out


def mean_of(values: Iterable[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def untargeted_summary(others: Sequence[dict[str, Any]], *, reset_others: bool) -> dict[str, Any]:
    """How many untargeted tensors a full fine-tune changed, the largest change, and what it means."""
    changed = [o for o in others if o["changed"]]
    largest = max((o for o in changed if o["rel_change"] is not None), key=lambda o: o["rel_change"], default=None)
    out: dict[str, Any] = {
        "untargeted_tensors": len(others),
        "untargeted_changed": len(changed),
        "largest_untargeted_change": None if largest is None else f"{largest['tensor']} {largest['rel_change']:.3g}",
    }
    if changed and not reset_others:
        # docs/design.md §5c/§5d: a changed module left uncorrected carries part of the update.
        out["note"] = (
            f"{len(changed)} untargeted tensors differ from the aligned model and are not corrected "
            "(they carry part of the fine-tune's update); --reset-others copies them from ALIGNED"
        )
    return out


def correction_summary(method: Any, options: Any, results: Sequence[Any], rows: Sequence[dict[str, Any]],
                       untargeted: Sequence[dict[str, Any]] | None, *, reset_others: bool) -> dict[str, Any]:  # fmt: skip
    """The update-wide summary: the method's own fields, the input's energy split, the untargeted tensors."""
    summary = {
        "modules": len(rows),
        **method.summary(results, options),
        **{f"input_{k}": v for k, v in weighted_rho(rows, "dw_norm_before").items()},
        "mean_cos_dW_D": mean_of(row.get("cos_dW_D") for row in rows),
    }
    if untargeted is not None:
        summary.update(untargeted_summary(untargeted, reset_others=reset_others))
    return summary
