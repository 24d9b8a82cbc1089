"""Scored model states kept on disk, so a killed `tune` resumes and a rerun scores nothing twice.

Scoring a state (the aligned model, the update, one setting) is nearly all of tune's time:
greedy answers to the validation prompts. With ``tune --score-cache DIR`` each state's record
(:class:`~csulora.tuning.scoring.StateRecord`: its answers batch by batch, which were truncated,
the forward-pass measures) is written to ``DIR/<key>.json`` as it grows, and read back instead
of generating again. A state scored lazily and later asked for completely generates only what
is missing (issue 21); answers are kept per prompt, and batches are fixed per prompt set
(:class:`~csulora.tuning.scoring.BatchPlan`), so a batch read back is the batch generated.

A key covers everything the answers depend on (docs/design.md §10):

- the model state: the aligned model's fingerprint (weights, tokenizer, chat template),
  plus the bytes of the adapter (``adapter_model.safetensors`` and ``adapter_config.json``)
  for the adapter and for each setting -- a setting is keyed by what it is, not by its
  knob, so the same corrected bytes reached any way are scored once;
- the validation data (every prompt, the task's references, and the framing of each framed set
  -- a framed run never reads a plain run's answers; a plain run's key is as before framings),
  the generation settings
  (batch size, new tokens, whether harmful answers stop early, bootstrap seed), device, dtype
  and csulora's version.

A state with no files of its own (a full checkpoint's settings, applied in memory) is not
cached. Entries are written atomically; a corrupt one is reported and scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csulora.io.atomic import atomic_output_file
from csulora.io.fingerprint import adapter_digest, model_fingerprint
from csulora.tuning.data import TuneData
from csulora.tuning.scoring import StateRecord
from csulora.version import __version__

SCHEMA = "csulora.score-cache/2"  # /2: answers per prompt and batch, measures apart (issue 21)


def data_digest(data: TuneData) -> str:
    """One sha256 over every prompt set and the task's reference responses."""
    payload: dict[str, Any] = {
        "sets": data.prompt_sets(),
        "task_references": [item["response"] for item in data.task],
    }
    if data.framing_keys():  # only when some set is framed: plain keys stay those of older runs
        payload["framings"] = data.framing_keys()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ScoreCache:
    """``DIR/<key>.json`` per scored state; see the module docstring for what a key covers."""

    def __init__(self, folder: str | os.PathLike, aligned: str | os.PathLike, data: TuneData,
                 generation: Mapping[str, Any]) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._common = {
            "schema": SCHEMA,
            "csulora": __version__,
            "aligned": model_fingerprint(aligned)["digest"],
            "data": data_digest(data),
            "generation": {k: str(v) for k, v in sorted(generation.items())},
        }
        self.read_states: list[str] = []  # states whose record existed (the run record says which)

    def key(self, adapter: str | os.PathLike | None) -> str:
        """The key of the aligned model (``adapter`` None) or of the aligned model plus an adapter folder."""
        state = {**self._common, "adapter": adapter_digest(adapter) if adapter is not None else None}
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str, state: str = "") -> StateRecord | None:
        """The stored record, or None when absent or unreadable (then the state is scored again)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            record = StateRecord.from_dict(json.loads(path.read_text())["record"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            print(f"csulora tune: ignoring unreadable score cache entry {path}: {err}")
            return None
        self.read_states.append(state)
        return record

    def save(self, key: str, record: StateRecord, state: str) -> None:
        entry = {"state": state, "key": key, **self._common, "record": record.to_dict()}
        with atomic_output_file(self.path(key)) as tmp:
            tmp.write_text(json.dumps(entry, ensure_ascii=False, allow_nan=False))
