"""The peers' parity benchmark end to end on toy shapes, against local stand-ins of the published code.

The published checkouts are not available offline, so stand-in files with the published
interfaces (``SafeDeltaRunner`` with ``add_batch``/``adjust_delta``, ``prune_wanda_outlier``), the
same module-level imports the benchmark has to stand in for, and ``torch.cuda.synchronize()``
are written to temporary folders; their arithmetic is the tests' own references
(tests/methods/test_safedelta.py, written from the definition). What is tested is the
benchmark's plumbing: loading by path, the run-time patches, the stand-in model the published
pruning hooks, and the comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import peers_parity as parity  # noqa: E402

SAFEDELTA_STAND_IN = '''
import torch
from datasets import load_dataset  # the published module imports these for its data loaders
from utils.prompt_utils import get_prompt_template
from tests.methods.test_safedelta import reference


class SafeDeltaRunner:
    def __init__(self, align_layer, sft_layer):
        self.align_layer, self.sft_layer = align_layer, sft_layer
        n = align_layer.weight.shape[1]
        self.H = torch.zeros(n, n)

    def add_batch(self, inp, out):
        x = inp.reshape(-1, inp.shape[-1]).double()
        self.H += (x.T @ x).float()

    def adjust_delta(self, s, blocksize=1024, percdamp=0.01):
        W = self.align_layer.weight.data.double()
        dW = self.sft_layer.weight.data.double() - W
        X, _ = reference(dW, self.H.double(), s, blocksize)
        torch.cuda.synchronize()  # the benchmark makes this a no-op on CPU
        self.align_layer.weight.data = (W + X).float()
'''

ANTIDOTE_STAND_IN = '''
import torch
from torch import nn


def prune_wanda_outlier(args, model, dataloader, device=None, prune_n=0, prune_m=0):
    full = args.full_finetuning == "True"
    layer = model.layers[0] if full else model.model.layers[0]
    wanted = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)
              and (any(p in name for p in ("q_proj", "k_proj", "v_proj")) if full else "lora" in name)}
    sums = {name: 0.0 for name in wanted}

    def hook(name):
        def record(_, inp, out):
            sums[name] = sums[name] + inp[0].reshape(-1, inp[0].shape[-1]).double().square().sum(0)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in wanted.items()]
    for batch in dataloader:
        model(batch["input_ids"])
    for handle in handles:
        handle.remove()
    masks = {}
    for name, m in wanted.items():
        W, norms = m.weight.data.double(), sums[name].sqrt()
        width = W.shape[1]
        keep = int(width * (1 - args.dense_ratio))
        mask = torch.zeros_like(m.weight.data)
        for i in range(W.shape[0]):
            ranked = sorted(range(width), key=lambda j: (float(W[i, j].abs() * norms[j]), j))
            mask[i, ranked[keep:]] = 1.0
        key = f"model.layers.0.{name}.weight" if full else f"base_model.model.model.layers.0.{name}.weight"
        masks[key] = mask
    return masks
'''


@pytest.fixture
def checkouts(tmp_path):
    safedelta = tmp_path / "SafeDelta"
    (safedelta / "llama2" / "safedelta").mkdir(parents=True)
    (safedelta / parity.SAFEDELTA_FILE).write_text(SAFEDELTA_STAND_IN)
    antidote = tmp_path / "Antidote"
    antidote.mkdir()
    (antidote / parity.ANTIDOTE_FILE).write_text(ANTIDOTE_STAND_IN)
    return safedelta, antidote


def test_toy_parity_runs_the_checkouts_and_agrees_with_the_references(checkouts, tmp_path):
    safedelta, antidote = checkouts
    out = tmp_path / "parity.json"
    synchronize = torch.cuda.synchronize
    assert parity.main(["--safedelta", str(safedelta), "--antidote", str(antidote), "--shapes", "toy", "--out", str(out)]) == 0
    assert torch.cuda.synchronize is synchronize and "datasets" not in sys.modules  # patches undone
    report = json.loads(out.read_text())
    assert len(report["safedelta"]) == 4 and {r["published_ties"] for r in report["safedelta"]} == {"as published", "stable"}
    for row in report["safedelta"]:
        assert row["kept_agreement"] == 1.0 and row["rel_diff"] < 1e-5
        assert 0 < row["kept_csulora"] < row["entries"]
        if row["published_ties"] == "stable":  # the stand-in's ties are stable either way
            assert row["rel_diff_published_stable_vs_as_published"] == 0.0
    kinds = {row["kind"] for row in report["antidote"]}
    assert kinds == {"full fine-tune", "adapter, rank 3"} and len(report["antidote"]) == 4
    for row in report["antidote"]:
        assert row["pruned_agreement"] == 1.0 and row["max_abs_diff"] == 0.0 and row["pruned_csulora"] > 0
    assert report["command"].startswith("python -m benchmarks.peers_parity --safedelta")


def test_compare_updates_reports_differences_and_agreement():
    ours = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    theirs = torch.tensor([[1.0, 0.5], [2.0, 3.0]])
    row = parity.compare_updates(ours, theirs, ours == 0, theirs == 0, "pruned")
    assert row["max_abs_diff"] == 0.5 and row["pruned_csulora"] == 1 and row["pruned_published"] == 0
    assert row["pruned_agreement"] == 0.0 and row["pruned_differing"] == 1
    assert row["rel_diff"] == pytest.approx(0.5 / float(theirs.norm()))


def test_a_missing_checkout_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="safedelta_runner.py: not found"):
        parity.load_safedelta(tmp_path)
    with pytest.raises(SystemExit, match="utils.py: not found"):
        parity.load_antidote(tmp_path)


def test_the_tables_come_from_the_result_file(checkouts, tmp_path, capsys):
    safedelta, antidote = checkouts
    out = tmp_path / "parity.json"
    parity.main(["--safedelta", str(safedelta), "--antidote", str(antidote), "--shapes", "toy", "--out", str(out)])
    capsys.readouterr()
    assert parity.main(["--table", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("| toy |") for line in lines) == 4
    assert sum(line.startswith("| toy full |") or line.startswith("| toy adapter |") for line in lines) == 4
