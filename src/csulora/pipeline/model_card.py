"""The model card (``README.md``) of a corrected adapter: what was done to it, and from what.

A corrected adapter must not carry its input's card or training record: those describe
how the *input* was trained (often the attack itself), not the correction. The card
written here replaces them and says what csulora did -- method and knobs, which modules,
where the safety subspace / displacement / calibration came from (with the subspace
cache's sha256 and the calibration file's own ``info``), the csulora version -- and points
to ``csulora_report.json`` beside it for the per-module numbers. The input's licence (from
its card's front matter) is kept: the correction is a derivative of that adapter.

Bytes are deterministic: no dates, sorted options, paths as the user gave them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csulora.version import __version__
from csulora.io.adapters import MODEL_CARD, files_not_copied
from csulora.io.fingerprint import file_sha256
from csulora.io.hub import looks_like_hub_id

__all__ = ["MODEL_CARD", "CorrectionCardFacts", "base_model_for", "correction_card", "render_correction_card"]
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)
_LICENSE_LINE = re.compile(r"^license:\s*(?P<value>[^#\n]+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class CorrectionCardFacts:
    """Everything the card says, as plain data (the pipeline fills it in)."""

    method: str
    method_title: str  # e.g. "RESTA (rank-k)"
    paper_url: str | None
    options: Mapping[str, Any]
    input_kind: str  # "adapter" or "checkpoint" (csulora.io.input_kind)
    output_kind: str  # what was written: "adapter" or "checkpoint" (a dense correction of an adapter)
    input_path: str  # as the user gave it: a folder or a hub id
    input_base_model: str | None  # an adapter's base_model_name_or_path; a checkpoint's ALIGNED
    base_model: str | None  # the written base_model_name_or_path (an adapter's) or ALIGNED
    corrected_modules: Sequence[str]
    total_modules: int
    report_file: str | None  # relative to the output folder, or None when written elsewhere
    subspace: Mapping[str, Any] | None = None  # {"file", "sha256", "options", "built_from"}
    displacement: Mapping[str, str] | None = None  # {"base", "aligned"}: D streamed exactly
    calibration: Mapping[str, Any] | None = None  # {"file", "info"}
    summary: Mapping[str, Any] = field(default_factory=dict)
    not_copied: Sequence[str] = ()
    license: str | None = None
    version: str = __version__

    @property
    def is_checkpoint(self) -> bool:
        """Whether the output is a full checkpoint (a full fine-tune's, or an adapter corrected densely)."""
        return self.output_kind == "checkpoint"


def base_model_for(aligned: str | os.PathLike | None) -> str | None:
    """The ``base_model_name_or_path`` to write: None keeps the input's; else ALIGNED as a hub
    id when the user gave one, or the aligned folder's resolved path."""
    if aligned is None:
        return None
    text = os.fspath(aligned)
    if not os.path.exists(text) and looks_like_hub_id(text):
        return text
    return str(Path(text).resolve())


def correction_card(
    *,
    method: Any,
    options: Mapping[str, Any],
    update: Any,
    input_spec: str | os.PathLike,
    corrected: Sequence[str],
    base_model: str | None,
    refs: Any,
    report_file: str | None,
    summary: Mapping[str, Any],
    sources: Mapping[str, str | None] | None = None,
    output_kind: str | None = None,
) -> str:
    """The card of a corrected output, from what the pipeline used.

    ``method``: the registered :class:`~csulora.methods.base.CorrectionMethod`; ``update``: the
    opened :class:`~csulora.pipeline.updates.Update`; ``refs``: its
    :class:`~csulora.pipeline.references.References`; ``sources``: how the report names them
    (``References.describe``), which the card uses for file names.
    """
    named = dict(sources or {})
    input_card = update.path / MODEL_CARD
    recorded = getattr(update, "recorded_base", None)
    facts = CorrectionCardFacts(
        method=method.name,
        method_title=method.pretty_name,
        paper_url=method.paper_url,
        options=options,
        input_kind=update.kind,
        output_kind=output_kind or update.kind,
        input_path=os.fspath(input_spec),
        input_base_model=recorded,
        base_model=base_model if base_model is not None else recorded,
        corrected_modules=list(corrected),
        total_modules=len(update.modules()),
        report_file=report_file,
        subspace=_subspace_facts(refs, named.get("subspace")),
        displacement=_displacement_facts(refs),
        calibration=_calibration_facts(refs, named.get("calibration")),
        summary=summary,
        not_copied=_not_copied(update),
        license=input_license(input_card.read_text(encoding="utf-8", errors="replace") if input_card.is_file() else None),
    )
    return render_correction_card(facts)


def _not_copied(update: Any) -> list[str]:
    from csulora.io import checkpoint_writer

    if update.kind == "checkpoint":
        return checkpoint_writer.files_not_copied(update.path)
    return files_not_copied(update.path)


def _subspace_facts(refs: Any, name: str | None) -> dict[str, Any] | None:
    cache = getattr(refs, "cache", None)
    if cache is None:
        return None
    return {
        "file": name or str(cache.path),
        "sha256": file_sha256(Path(cache.path)),  # the cache's bytes are deterministic: its hash names it
        "options": cache.options,
        "built_from": dict(cache.meta.get("sources") or {}),
    }


def _displacement_facts(refs: Any) -> dict[str, str] | None:
    base, aligned = getattr(refs, "base", None), getattr(refs, "aligned", None)
    if base is None or aligned is None:
        return None
    return {"base": str(base.folder), "aligned": str(aligned.folder)}


def _calibration_facts(refs: Any, name: str | None) -> dict[str, Any] | None:
    calibration = getattr(refs, "calibration", None)
    if calibration is None:
        return None
    return {"file": name or str(calibration.path), "info": dict(calibration.info)}


def input_license(card_text: str | None) -> str | None:
    """``license:`` from a model card's YAML front matter (one plain value), else None."""
    if not card_text:
        return None
    front = _FRONT_MATTER.match(card_text)
    if front is None:
        return None
    found = _LICENSE_LINE.search(front.group(1))
    return found["value"].strip("'\"") if found else None


def render_correction_card(facts: CorrectionCardFacts) -> str:
    """The README.md text of a corrected adapter or checkpoint folder."""
    what = "full checkpoint" if facts.is_checkpoint else "LoRA adapter"
    source = "LoRA adapter" if facts.input_kind == "adapter" else "full checkpoint"
    lines = ["---", *_front_matter(facts), "---", "", f"# Safety-corrected {what} ({facts.method})", ""]
    if facts.input_kind == "adapter" and facts.is_checkpoint:
        lines += [f"The method `{facts.method}` corrects the adapter's dense update, so this folder is "
                  "the corrected model, no longer a LoRA (`--lora-rank R` writes its best rank-R LoRA instead).", ""]
    lines += [
        f"A corrected copy of the {source} `{facts.input_path}`, written by csulora {facts.version} to "
        "restore the refusals of the aligned model it was trained on while keeping the fine-tune's task gains. "
        "Nothing was retrained: each corrected module's update was rewritten in closed form.",
        "",
        *_loading(facts),
        "## What was done",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{facts.method}`: {facts.method_title}" + (f" ({facts.paper_url})" if facts.paper_url else "") + " |",
        f"| options | {_options(facts.options)} |",
        f"| modules corrected | {_modules(facts)} |",
    ]
    lines += _source_rows(facts)
    lines += _input_rows(facts)
    summary = _summary(facts.summary)
    if summary:
        lines += ["Update-wide: " + summary + ".", ""]
    if facts.report_file is not None:
        lines += [
            f"Per-module numbers (energy split rho_F/P/O, cosines, norms before and after, the method's own): "
            f"`{facts.report_file}` beside this file.",
            "",
        ]
    if facts.not_copied:
        names = ", ".join(f"`{name}`" for name in facts.not_copied)
        lines += [
            "## Not copied from the input",
            "",
            f"{names}: they describe how the input was made (its model card, training record), "
            "not this correction; they are still in the input folder.",
            "",
        ]
    lines += [
        "Whether the correction worked is measured, not assumed: `csulora eval` gives attack success "
        "rate, over-refusal and task utility with 95% intervals (see the csulora README).",
    ]
    return "\n".join(lines) + "\n"


def _loading(facts: CorrectionCardFacts) -> list[str]:
    if facts.is_checkpoint:
        return [
            "It is a checkpoint folder with the input's shard layout:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            "```",
            "",
        ]
    return [
        "It is a plain PEFT LoRA folder:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(facts.base_model or 'ALIGNED')})",
        'model = PeftModel.from_pretrained(model, "path/to/this/folder")',
        "```",
        "",
    ]


def _input_rows(facts: CorrectionCardFacts) -> list[str]:
    if facts.input_kind == "checkpoint":
        rows = [f"| input checkpoint | `{facts.input_path}` |", f"| aligned model (dW = W_ft - W_aligned) | {_code(facts.base_model)} |"]
    else:
        rows = [
            f"| input adapter | `{facts.input_path}` |",
            f"| input's base model | {_code(facts.input_base_model)} |",
            f"| base model (this folder) | {_code(facts.base_model)}{_missing_note(facts.base_model)} |",
        ]
    return rows + [f"| csulora | {facts.version} |", ""]


def _front_matter(facts: CorrectionCardFacts) -> list[str]:
    lines = []
    if facts.base_model and looks_like_hub_id(facts.base_model):  # the hub accepts only repo ids here
        lines.append(f"base_model: {json.dumps(facts.base_model)}")
    lines.append("library_name: peft")
    if facts.license:
        lines.append(f"license: {json.dumps(facts.license)}")
    lines += ["tags:", "- lora", "- csulora", "- safety", f"- csulora-{facts.method}"]
    return lines


def _source_rows(facts: CorrectionCardFacts) -> list[str]:
    rows = []
    if facts.subspace is not None:
        built = facts.subspace.get("built_from") or {}
        origin = f"; built from base {_code(built.get('base'))}, aligned {_code(built.get('aligned'))}" if built else ""
        rows.append(
            f"| safety subspace | `{facts.subspace['file']}` (sha256 `{facts.subspace['sha256']}`), "
            f"options {_options(facts.subspace.get('options') or {})}{origin} |"
        )
    if facts.displacement is not None:
        rows.append(
            f"| D = ALIGNED - BASE (exact, streamed) | base {_code(facts.displacement.get('base'))}, "
            f"aligned {_code(facts.displacement.get('aligned'))} |"
        )
    if facts.calibration is not None:
        rows.append(f"| calibration | `{facts.calibration['file']}`: {_calibration_text(facts.calibration.get('info') or {})} |")
    return rows


def _calibration_text(info: Mapping[str, Any]) -> str:
    """The calibration file's record in words: which model, which data, how generated."""
    parts = []
    fingerprint = info.get("model_fingerprint") or {}
    if isinstance(fingerprint, Mapping) and fingerprint.get("digest"):
        parts.append(f"aligned model fingerprint `{str(fingerprint['digest'])[:16]}`")
    harmful = info.get("harmful") or {}
    if harmful:
        specs = ", ".join(str(s) for s in harmful.get("specs") or [])
        parts.append(f"{harmful.get('prompts', '?')} harmful prompts ({specs}) with the model's own answers")
    task = info.get("task") or {}
    if task:
        parts.append(f"{task.get('examples', '?')} task examples (`{task.get('spec')}`)")
    generation = info.get("generation") or {}
    if generation.get("max_new_tokens") is not None:
        parts.append(f"answers of at most {generation['max_new_tokens']} greedy tokens")
    if info.get("dtype") or info.get("device"):
        parts.append(f"{info.get('dtype', '?')} on {info.get('device', '?')}")
    return "; ".join(parts) or "no record"


def _options(options: Mapping[str, Any]) -> str:
    shown = [f"{key}={_value(value)}" for key, value in sorted(options.items()) if value is not None]
    return ", ".join(f"`{item}`" for item in shown) or "–"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _modules(facts: CorrectionCardFacts) -> str:
    count = f"{len(facts.corrected_modules)} of {facts.total_modules}"
    if len(facts.corrected_modules) == facts.total_modules:
        return f"{count} (all adapted modules)"
    return f"{count} (the others are copied unchanged)"


def _summary(summary: Mapping[str, Any]) -> str:
    parts = []
    for key, value in summary.items():
        if isinstance(value, bool) or value is None or isinstance(value, Mapping | list):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def _missing_note(base_model: str | None) -> str:
    """A recorded base path that is no folder here (e.g. where the input was trained) says how to fix it."""
    if not base_model or looks_like_hub_id(base_model) or Path(base_model).is_dir():
        return ""
    return " (no such folder here: pass `--aligned ALIGNED` to `csulora correct` to record the right one)"


def _code(text: str | None) -> str:
    return f"`{text}`" if text else "–"

