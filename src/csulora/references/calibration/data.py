"""What ``calibrate`` runs the aligned model on, and the checks on it (docs/design.md §5c).

Everything here is refused before a model is loaded: the harmful prompts (disjoint from every
prompt set ``tune`` or ``eval`` scores), the task data (the adapter's *training* data, never a
split ``tune`` selects on or a test split), the target modules (from the checkpoint's header)
and the numeric options. It also tokenizes both sets as the statistics pass reads them, and
names the files the data came from (an output may never be or lie inside one of them).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from csulora.errors import InputError, OptionError
from csulora.eval.prompts import PYRIT_INSTALL, Prompt, normalise_prompt
from csulora.eval.specs import load_prompts
from csulora.eval.tasks import BUILTIN_TASKS, builtin_task, load_task, task_splits
from csulora.io.checkpoints import CheckpointReader, decoder_linear_modules, target_list
from csulora.training.data import chat_prompt_ids, response_ids
from csulora.training.framing import PLAIN, Framing

# The length of the aligned model's greedy answers to the harmful prompts: one default for
# `csulora calibrate` and `tune --calibration-task` (issue 23), so both routes measure the same
# statistics for the same data. The file's metadata records the value used (info.generation).
CALIBRATION_MAX_NEW_TOKENS = 64
TASK_TRAIN_SPLIT = "train"
HELD_OUT_ROLE = {"validation": "the split tune selects on", "test": "a test split"}  # a built-in task's other splits
DEFAULT_HARMFUL_SPECS = ("advbench:align", "requests")  # calibration_harmful_prompts()


def pyrit_installed() -> bool:
    try:
        importlib.metadata.distribution("pyrit")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def spec_list(specs: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list[str] | None:
    """SPECs as strings; one SPEC given alone is a list of one."""
    if specs is None:
        return None
    return [str(specs)] if isinstance(specs, (str, os.PathLike)) else [str(s) for s in specs]


def harmful_prompts(specs: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list[Prompt]:
    """The harmful calibration prompts, checked disjoint from every scored set (docs/design.md §5c).

    ``None``: AdvBench ``align`` + ``requests``; otherwise the prompts of every SPEC in order
    (they replace the default). Both need pyrit: for AdvBench itself, or to check the user's
    prompts against the AdvBench and airt validation and test splits.
    """
    from csulora.eval.calibration_sets import calibration_harmful_prompts, check_disjoint, held_out_sets

    specs = spec_list(specs)
    if specs == []:
        raise OptionError("--harmful needs at least one SPEC")
    if not pyrit_installed():
        if specs is None:
            raise InputError(
                f"the default harmful prompts (AdvBench align + requests) need pyrit: run `{PYRIT_INSTALL}`, "
                "or give --harmful SPEC"
            )
        raise InputError(
            f"checking --harmful against the AdvBench/airt validation and test splits needs pyrit: run `{PYRIT_INSTALL}`"
        )
    prompts = calibration_harmful_prompts() if specs is None else [p for s in specs for p in load_prompts(s)]
    check_disjoint(prompts, held_out_sets())
    return prompts


def task_pairs(spec: str | os.PathLike) -> list[dict]:
    """The adapter's task data, prompt + response: a JSONL file, ``date:train`` or ``triage:train``.

    Refused: the splits ``tune`` selects on and the test splits of the built-in tasks
    (``date:validation``, ``date``/``date:test``, the same of ``triage``), a JSONL file holding
    one of their prompts, and prompt sets (no responses).
    """
    text = str(spec)
    path = Path(text)
    if not path.is_file() and not path.suffix:
        name, _, split = text.partition(":")
        if name in BUILTIN_TASKS:
            split = split or "test"  # what a bare task name means everywhere else (eval/tasks.load_task)
            if split == TASK_TRAIN_SPLIT:
                return builtin_task(name, split)
            role = HELD_OUT_ROLE.get(split, "not a split")
            raise InputError(
                f"--task {text}: {role}; calibrate on the adapter's training data ({name}:train or its JSONL)"
            )
        raise InputError(
            f"--task {text}: not task data; give the adapter's training data "
            '(JSONL of {"prompt", "response"}), date:train or triage:train'
        )
    pairs = load_task(text)  # InputError naming file:line for a record without prompt/response
    check_task_not_held_out(pairs, path)
    return pairs


def check_task_not_held_out(pairs: Sequence[dict], file: Path) -> None:
    """Refuse task data that holds a prompt of a built-in task's validation or test split."""
    held_out = {
        normalise_prompt(item["prompt"]): f"{name}:{split}"
        for name in BUILTIN_TASKS
        for split, items in task_splits(name).items()
        if split in HELD_OUT_ROLE
        for item in items
    }
    for number, pair in enumerate(pairs, start=1):
        where = held_out.get(normalise_prompt(pair["prompt"]))
        if where is not None:
            raise InputError(
                f"{file}: record {number} is a prompt of {where}; calibrate on the adapter's training data, "
                "never on a split tune selects on or a test split"
            )


def input_files(task: str | os.PathLike, harmful: Sequence[str] | None) -> dict[str, Path]:
    """The files the data is read from (flag -> path): the task file, and each ``--harmful``
    SPEC that names a file (``FILE`` or ``FILE:FIELD``, as :func:`csulora.eval.specs.load_prompts`
    reads it). Named sets (``requests``, ``date:train``) are no files of the user's."""
    files: dict[str, Path] = {}
    if Path(task).is_file():
        files["--task"] = Path(task)
    for number, spec in enumerate(harmful or [], start=1):
        head, sep, _tail = spec.rpartition(":")
        file = Path(spec) if Path(spec).is_file() else Path(head) if sep and Path(head).is_file() else None
        if file is not None:
            files[f"--harmful ({number})"] = file
    return files


def target_modules(aligned: str | os.PathLike, targets: Iterable[str] | str | None) -> list[str]:
    """The decoder linear layers to calibrate (names as in the checkpoint), from its header only."""
    wanted = target_list(targets)
    with CheckpointReader(aligned) as reader:
        modules = decoder_linear_modules(reader, wanted)
    if not modules:
        if wanted is None:
            raise InputError(f"{aligned}: no linear layers in decoder blocks")
        raise OptionError(f"--targets {','.join(wanted)} matches no linear layer of {aligned}'s decoder blocks")
    return modules


def check_options(max_new_tokens: int, batch_size: int, memory_budget_gb: float | None) -> None:
    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    if memory_budget_gb is not None and not memory_budget_gb > 0:
        raise OptionError(f"--memory-budget must be > 0 GB, got {memory_budget_gb}")


def set_digest(records: Iterable[Any]) -> str:
    """sha256 of a data set's content in order (JSON of each record, one a line)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def harmful_sequences(tokenizer, prompts: Sequence[Prompt], answers: Sequence[str],
                      framing: Framing = PLAIN) -> list[dict]:  # fmt: skip
    """Each harmful prompt through the chat template (in ``framing``), then the aligned model's own
    answer and end of turn: the positions where the refusal is generated are covered (docs/design.md §5c)."""
    return [{"input_ids": chat_prompt_ids(tokenizer, p.text, framing) + response_ids(tokenizer, a)}
            for p, a in zip(prompts, answers)]  # fmt: skip


def task_sequences(tokenizer, pairs: Sequence[Mapping], framing: Framing = PLAIN) -> list[dict]:
    """Task prompt (in ``framing``) + response, tokenized as for training (docs/design.md §10)."""
    return [{"input_ids": chat_prompt_ids(tokenizer, p["prompt"], framing) + response_ids(tokenizer, p["response"])}
            for p in pairs]  # fmt: skip
