"""Shared data and helpers of the ``csulora.references.calibration`` tests (docs/design.md §5c).

On the tiny world's aligned model with a dozen harmful prompts (AdvBench ``align``) and a
dozen ``date:train`` items, 16 new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from csulora.references.calibration import calibrate
from csulora.references.calibration.data import harmful_prompts, task_pairs
from csulora.training.data import chat_prompt_ids, response_ids
from tests.fixtures_tiny import leftovers

MAX_NEW = 16
N_PROMPTS = 12
L0, L1 = "model.layers.0", "model.layers.1"


def write_lines(path: Path, texts) -> Path:
    path.write_text("\n".join(texts) + "\n")
    return path


def write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p["response"]}) + "\n" for p in pairs))
    return path


def run(world, out: Path, data, **options):
    """calibrate on the test data; the answer cache is off unless a test turns it on."""
    options = {"task": data.task, "harmful": [str(data.harmful)], "max_new_tokens": MAX_NEW, "batch_size": 4,
               "device": "cpu", "progress": False, "answer_cache": False, **options}  # fmt: skip
    return calibrate(world.aligned, out, **options)


def assert_nothing_written(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == []
    assert leftovers(folder) == []


def captured_inputs(model, sequences, names) -> dict[str, torch.Tensor]:
    """Each module's inputs on every token, one unpadded sequence at a time (float64)."""
    modules = dict(model.named_modules())
    rows = {name: [] for name in names}
    handles = [
        modules[name].register_forward_pre_hook(lambda _m, inputs, name=name: rows[name].append(inputs[0][0].clone()))
        for name in names
    ]
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows[name]).double() for name in names}


def normalised_gram(X: torch.Tensor) -> torch.Tensor:
    S = X.T @ X / X.shape[0]
    return S / (torch.trace(S) / S.shape[0])


def sequences_of(tokenizer, data, answers):
    """(prompt texts, harmful token ids, task token ids) as calibrate builds them."""
    prompts = [p.text for p in harmful_prompts([str(data.harmful)])]
    harmful = [chat_prompt_ids(tokenizer, p) + response_ids(tokenizer, a) for p, a in zip(prompts, answers)]
    task = [chat_prompt_ids(tokenizer, p["prompt"]) + response_ids(tokenizer, p["response"]) for p in task_pairs(data.task)]
    return prompts, harmful, task
