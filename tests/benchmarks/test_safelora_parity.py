"""The parity script's comparison (the published code itself is not available offline)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import safelora_parity as parity  # noqa: E402


def _factors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.model.layers.{i}.self_attn.q_proj": torch.randn(6, 2, generator=g) for i in range(3)}


def test_identical_projections_agree_and_count_projected_modules():
    original = _factors(0)
    projected = dict(original)
    projected["base_model.model.model.layers.1.self_attn.q_proj"] = original["base_model.model.model.layers.1.self_attn.q_proj"] * 0.5
    theirs = {k: v.clone() for k, v in projected.items()}
    row = parity.compare(projected, theirs, original)
    assert row["same_modules_projected"] and row["projected_csulora"] == row["projected_published"] == 1
    assert row["max_abs_diff_lora_B"] == 0.0


def test_a_module_projected_by_one_side_only_is_reported():
    original = _factors(1)
    ours = dict(original)
    name = "base_model.model.model.layers.2.self_attn.q_proj"
    ours[name] = original[name] * 0.0
    row = parity.compare(ours, dict(original), original)
    assert not row["same_modules_projected"]
    assert row["only_csulora"] == ["model.layers.2.self_attn.q_proj"] and row["only_published"] == []
    assert row["max_rel_diff_lora_B"] == pytest.approx(1.0)


def test_missing_published_checkout_is_a_clear_exit(tmp_path):
    with pytest.raises(SystemExit, match="model.py: not found"):
        parity.load_published(tmp_path)
