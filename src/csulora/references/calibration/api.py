"""``calibrate``: the aligned model's activation statistics for one task, written to one file
(docs/design.md §5c).

The steps, each in its own module of this package: refuse what can be refused before a model
is loaded (:mod:`.data`, :mod:`.outputs`); load the model; the aligned model's greedy answers
to the harmful prompts, read from the answer cache when it holds them (:mod:`.answers`); the
Gram groups, the passes the memory budget allows and the statistics pass (:mod:`.groups`,
:mod:`.passes`, :mod:`.statistics`); the file, whose metadata says what the statistics were
computed from, and its run record, which says how this run went (:mod:`.outputs`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csulora.eval.generation import DEFAULT_BATCH_SIZE
from csulora.eval.prompts import Prompt
from csulora.io.calibration_file import MODEL_FINGERPRINT_KEY, save_calibration
from csulora.io.checkpoints import target_list
from csulora.io.fingerprint import model_fingerprint
from csulora.io.hub import looks_like_hub_id, resolve_model_dir
from csulora.io.modeling import load_model, resolve_device, resolve_dtype
from csulora.references.calibration.answers import AlignedAnswers, AnswerKey, aligned_answers, answer_cache_dir
from csulora.references.calibration.data import (
    CALIBRATION_MAX_NEW_TOKENS,
    DEFAULT_HARMFUL_SPECS,
    check_options,
    harmful_prompts,
    harmful_sequences,
    input_files,
    set_digest,
    spec_list,
    target_modules,
    task_pairs,
    task_sequences,
)
from csulora.references.calibration.groups import GramGroup, linear_modules
from csulora.references.calibration.outputs import RUN_RECORD_FORMAT, OutputPaths, publish, staged_output
from csulora.references.calibration.passes import StatisticsPlan, statistics_pass
from csulora.references.calibration.statistics import product_dtype_for
from csulora.training.framing import PLAIN, Framing, load_framing
from csulora.types import ModuleCalibration
from csulora.version import __version__


@dataclass
class CalibrationResult:
    """What ``calibrate`` wrote and measured."""

    path: Path
    modules: dict[str, str]  # module -> Gram group
    groups: list[GramGroup]
    harmful_tokens: int
    task_tokens: int
    passes: int
    seconds: dict[str, float]
    answers: list[str] = field(repr=False)  # the aligned model's answer to each harmful prompt, in order
    info: dict[str, Any] = field(repr=False, default_factory=dict)  # the metadata written to the file
    answers_read_back: bool = False  # the answers came from the answer cache: nothing was generated
    record_path: Path | None = None  # <path>.run.json: timings and machine facts (None: not written)
    run: dict[str, Any] = field(repr=False, default_factory=dict)  # what the run record holds


@dataclass(frozen=True)
class Inputs:
    """Everything ``calibrate`` reads, checked, before a model is loaded."""

    aligned: Path  # the local folder (a hub id resolved)
    given: str  # ALIGNED as the user gave it
    modules: list[str]
    prompts: list[Prompt]
    pairs: list[dict]
    framing: Framing = PLAIN  # the chat form of the harmful and the task prompts


@dataclass
class Measured:
    """What the run computed."""

    fingerprint: dict[str, Any]
    answers: AlignedAnswers
    plan: StatisticsPlan
    calibrations: dict[str, ModuleCalibration]
    harmful_tokens: int
    task_tokens: int
    budget: int
    seconds: dict[str, float] = field(default_factory=dict)


def logger(progress: bool):
    def log(message: str) -> None:
        if progress:
            print(f"calibrate: {message}", file=sys.stderr, flush=True)

    return log


@contextlib.contextmanager
def timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - started


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_inputs(aligned: Path, given: str, task, harmful, targets, framing: Framing = PLAIN) -> Inputs:
    """Targets from the checkpoint's header, the harmful prompts and the task data, all checked."""
    modules = target_modules(aligned, targets)
    return Inputs(aligned, given, modules, harmful_prompts(harmful), task_pairs(task), framing)


def answer_key(fingerprint: Mapping, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int,
               device: torch.device, dtype: torch.dtype, framing: Framing = PLAIN) -> AnswerKey:  # fmt: skip
    import transformers

    return AnswerKey(
        model=fingerprint["digest"], prompts_sha256=set_digest(p.text for p in prompts), prompts=len(prompts),
        max_new_tokens=max_new_tokens, batch_size=batch_size, device=device.type, dtype=dtype_name(dtype),
        csulora_version=__version__, torch_version=torch.__version__, transformers_version=transformers.__version__,
        framing=None if framing.is_plain else framing.key(),
    )  # fmt: skip


def measure(inputs: Inputs, *, max_new_tokens: int, batch_size: int, memory_budget_gb: float | None,
            device: torch.device, dtype: torch.dtype, cache_dir: Path | None, progress: bool, log) -> Measured:  # fmt: skip
    """Load the model, get its answers (cached or generated), run the statistics pass."""
    seconds: dict[str, float] = {}
    with timed(seconds, "fingerprint_and_load"):
        fingerprint = model_fingerprint(inputs.aligned)
        model, tokenizer = load_model(inputs.aligned, device=device, dtype=dtype)
        linears = linear_modules(model, inputs.modules, inputs.aligned)
    key = answer_key(fingerprint, inputs.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     device=device, dtype=dtype, framing=inputs.framing)  # fmt: skip
    with timed(seconds, "generation"):
        texts = [p.text for p in inputs.prompts]
        answers = aligned_answers(model, tokenizer, texts, key, cache_dir, progress=progress, log=log,
                                  framing=inputs.framing)  # fmt: skip
    with timed(seconds, "statistics"):
        harmful = harmful_sequences(tokenizer, inputs.prompts, answers.answers, inputs.framing)
        task = task_sequences(tokenizer, inputs.pairs, inputs.framing)
        plan, calibrations, budget = statistics_pass(
            model, tokenizer, linears, harmful, task, memory_budget_gb=memory_budget_gb, device=device,
            dtype=dtype, batch_size=batch_size, progress=progress, log=log,
        )  # fmt: skip
    return Measured(
        fingerprint, answers, plan, calibrations, harmful_tokens=sum(len(e["input_ids"]) for e in harmful),
        task_tokens=sum(len(e["input_ids"]) for e in task), budget=budget, seconds=seconds,
    )  # fmt: skip


def statistics_info(inputs: Inputs, measured: Measured, *, task, harmful, targets, max_new_tokens: int,
                    batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """The file's metadata: what the statistics were computed from, nothing that differs
    between identical runs (that goes to the run record: :func:`run_record`)."""
    pairs = inputs.pairs
    return {
        "csulora_version": __version__,
        MODEL_FINGERPRINT_KEY: measured.fingerprint,
        "aligned": model_text(inputs.given),
        "targets": target_list(targets),
        "modules": len(inputs.modules),
        "groups": len(measured.plan.groups),
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True, "chat_template": True, "batch_size": batch_size},
        "framing": inputs.framing.key(),  # the chat form of the harmful and the task prompts
        "device": device.type,
        "dtype": dtype_name(dtype),
        "products": dtype_name(product_dtype_for(device, dtype)),
        "accumulation": "float64",
        "harmful": {
            "specs": spec_list(harmful) or list(DEFAULT_HARMFUL_SPECS),
            "prompts": len(inputs.prompts),
            "sha256": set_digest(p.text for p in inputs.prompts),
            "answers_sha256": set_digest(measured.answers.answers),
            "tokens": measured.harmful_tokens,
        },
        "task": {
            "spec": str(task),
            "examples": len(pairs),
            "sha256": set_digest({"prompt": p["prompt"], "response": p["response"]} for p in pairs),
            "tokens": measured.task_tokens,
        },
    }


def model_text(given: str) -> str:
    """A model as the file records it: a hub id as given, a folder as its resolved path."""
    return given if looks_like_hub_id(given) and not os.path.exists(given) else str(Path(given).resolve())


def run_record(paths: OutputPaths, measured: Measured, device: torch.device) -> dict[str, Any]:
    """How this run went: the only file of a rerun allowed to differ (issue 23)."""
    return {
        "format": RUN_RECORD_FORMAT,
        "statistics_file": paths.statistics.name,
        "seconds": {k: round(v, 3) for k, v in measured.seconds.items()},
        "answers": {**measured.answers.cache, "read_back": measured.answers.read_back,
                    "generated_tokens": measured.answers.generated_tokens},  # fmt: skip
        "memory_budget_bytes": measured.budget,
        "passes": len(measured.plan.passes),
        "passes_resume_from_cached_hidden_states": measured.plan.blocks is not None,
        "machine": machine_facts(device),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def machine_facts(device: torch.device) -> dict[str, Any]:
    """Where the run ran, for its run record."""
    return {"device": str(device), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def calibrate(
    aligned: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    task: str | os.PathLike,
    harmful: Sequence[str | os.PathLike] | str | None = None,
    targets: Iterable[str] | str | None = None,
    max_new_tokens: int = CALIBRATION_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget_gb: float | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
    answer_cache: str | os.PathLike | bool = True,
    run_record_file: bool = True,
    framing: str | Framing | None = None,
) -> CalibrationResult:
    """Write the calibration statistics of ``aligned`` for one task to ``out_file`` (docs/design.md §5c).

    ``aligned``: a checkpoint folder or a hub id; ``task``: the adapter's training data (JSONL of
    prompt/response, or ``date:train``); ``harmful``: prompt SPECs replacing the default AdvBench
    ``align`` + ``requests``; ``targets``: module names or suffixes (default every linear layer of
    the decoder blocks); ``memory_budget_gb``: how much the Gram sums of one pass may take (default
    half the memory free once the model is loaded). ``answer_cache``: the folder of the aligned
    model's cached answers (True: ``$CSULORA_CACHE/calibration-answers`` or the user cache; False:
    none). The output is written atomically; an existing one needs ``force``; beside it
    ``<out_file>.run.json`` records timings and machine facts (``run_record_file=False``: not written).
    ``framing``: the chat form of the harmful and the task prompts, for their answers and statistics
    (a name, a JSON framing file or a :class:`~csulora.training.framing.Framing`; None: plain); the
    file's metadata records it (``info["framing"]``).
    """
    log = logger(progress)
    chosen_framing = load_framing(framing)  # an unknown name is refused before anything is read
    check_options(max_new_tokens, batch_size, memory_budget_gb)
    paths = OutputPaths.checked(out_file, run_record_file, force)
    aligned_dir = resolve_model_dir(aligned, "ALIGNED")
    cache_dir = answer_cache_dir(answer_cache)
    paths.check_apart({"ALIGNED": aligned_dir, **input_files(task, spec_list(harmful))}, cache_dir)
    run_device, model_dtype = resolve_device(device), resolve_dtype(dtype)
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": run_device, "dtype": model_dtype}
    with staged_output(paths.statistics) as staging:
        inputs = read_inputs(aligned_dir, os.fspath(aligned), task, harmful, targets, chosen_framing)
        measured = measure(inputs, memory_budget_gb=memory_budget_gb, cache_dir=cache_dir,
                           progress=progress, log=log, **settings)  # fmt: skip
        info = statistics_info(inputs, measured, task=task, harmful=harmful, targets=targets, **settings)
        modules = {m: g.name for g in measured.plan.groups for m in g.modules}
        save_calibration(staging, measured.calibrations, modules, info, force=True)
        record = run_record(paths, measured, run_device)
        publish(staging, paths, record)
    return CalibrationResult(
        path=paths.statistics, modules=modules, groups=measured.plan.groups, harmful_tokens=measured.harmful_tokens,
        task_tokens=measured.task_tokens, passes=len(measured.plan.passes), seconds=measured.seconds,
        answers=measured.answers.answers, info=info, answers_read_back=measured.answers.read_back,
        record_path=paths.record, run=record,
    )  # fmt: skip
