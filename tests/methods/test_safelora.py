"""Safe LoRA against a dense, in-test transcription of the published semantics (docs/design.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.errors import OptionError
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleInput
from csulora.methods.safelora import APPROX_NEEDS_D, SafeLora, SafeLoraConfig
from csulora.linalg.subspace import SubspaceConfig, compute_subspace

METHOD = SafeLora()


def make_module(i, m, n, r, *, seed, k=3, scale=2.0, D=None, B=None, A=None):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=torch.float64) if B is None else B
    A = torch.randn(r, n, generator=g, dtype=torch.float64) if A is None else A
    # Make part of the update follow D so cosines spread over [0, 1].
    if D is None:
        # float64 D: products with D are taken in D's precision, so this is compared exactly.
        D = torch.randn(m, n, generator=g, dtype=torch.float64) + float(torch.rand(1, generator=g)) * 3 * (B @ A)
    return ModuleInput(
        name=f"model.layers.{i}.self_attn.q_proj",
        update=LoraUpdate(A=A, B=B, scale=scale),
        subspace=compute_subspace(D, SubspaceConfig(rank=min(k, m, n), algorithm="exact")),
        displacement=D,
    )


def published(modules, *, select, num_layers, threshold, projection):
    """Dense transcription of the published code: m x m C per layer, two passes in number mode."""
    Cs = []
    for module in modules:
        if projection == "approx":
            D = module.displacement.double()
            Cs.append(D @ D.T / torch.norm(D))
        else:
            U = module.subspace.U
            Cs.append(U @ U.T)

    def one_pass(t):
        cos_total, dists, new_Bs = [], [], []
        for module, C in zip(modules, Cs):
            B, A = module.update.B, module.update.A
            W = C @ B
            cos = np.round(F.cosine_similarity((W @ A).reshape(1, -1), (B @ A).reshape(1, -1)).item(), 5)
            cos_total.append(cos)
            new_B = W if cos <= t else B
            new_Bs.append(new_B)
            dists.append((1 / (1 + torch.norm(new_B.reshape(1, -1) - W.reshape(1, -1)))).item())
        return cos_total, dists, new_Bs

    if select == "threshold":
        cos, dists, new_Bs = one_pass(threshold)
        t = threshold
    else:
        cos, _, _ = one_pass(0.5)
        t = np.sort(cos)[:num_layers][-1]
        cos, dists, new_Bs = one_pass(t)
    return cos, float(np.mean(dists)), new_Bs, t


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(1, 6),
    m=st.integers(2, 7), n=st.integers(2, 7), r=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    select=st.sampled_from(["number", "threshold"]),
    num_layers=st.integers(1, 8),
    threshold=st.sampled_from([-0.2, 0.3, 0.5, 0.8]),
    projection=st.sampled_from(["approx", "exact"]),
)
def test_matches_published_semantics(count, m, n, r, seed, select, num_layers, threshold, projection):
    modules = [make_module(i, m, n, r, seed=seed + i) for i in range(count)]
    config = SafeLoraConfig(select=select, num_layers=num_layers, threshold=threshold, projection=projection)
    results = list(METHOD.correct(iter(modules), config))
    cos, pdst, new_Bs, t = published(modules, select=select, num_layers=num_layers, threshold=threshold, projection=projection)
    assert [res.report["safelora_cos"] for res in results] == pytest.approx(list(cos), abs=1e-12)
    for res, module, new_B, c in zip(results, modules, new_Bs, cos):
        assert torch.allclose(res.update.B, new_B, atol=1e-10)
        assert res.update.A is module.update.A  # only lora_B changes
        assert res.report["projected"] == bool(c <= t)
        assert set(res.report) == set(REPORT_KEYS) | {"safelora_dist"}
    summary = METHOD.summary(results, config)
    assert summary["pdst"] == pytest.approx(pdst, rel=1e-10)
    assert summary["safelora_threshold"] == pytest.approx(float(t))
    assert summary["num_projected"] == sum(1 for c in cos if c <= t)


def test_number_mode_ties_project_more():
    g = torch.Generator().manual_seed(4)
    twin = make_module(0, 6, 5, 2, seed=1, D=torch.randn(6, 5, generator=g))
    B, A = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    other = make_module(2, 6, 5, 2, seed=9, B=B, A=A, D=(B @ A).float())  # cosine ~ 1
    modules = [twin, make_module(1, 6, 5, 2, seed=0, D=twin.displacement, B=twin.update.B, A=twin.update.A), other]
    config = SafeLoraConfig(select="number", num_layers=1)
    results = list(METHOD.correct(modules, config))
    cos = [res.report["safelora_cos"] for res in results]
    assert cos[0] == cos[1] < cos[2]
    assert [res.report["projected"] for res in results] == [True, True, False]


def test_rounding_to_five_decimals_makes_near_ties_ties():
    base = make_module(0, 6, 5, 2, seed=1)
    near = None
    # A second layer whose raw cosine differs from the first but rounds to the same value.
    for step in range(1, 200):
        B2 = base.update.B.clone()
        B2[0, 0] += step * 1e-7
        candidate = make_module(1, 6, 5, 2, seed=0, D=base.displacement, B=B2, A=base.update.A)
        raw = [
            F.cosine_similarity((C @ mod.update.B @ mod.update.A).reshape(1, -1), (mod.update.B @ mod.update.A).reshape(1, -1)).item()
            for mod in (base, candidate)
            for C in [mod.displacement.double() @ mod.displacement.double().T / mod.displacement.double().norm()]
        ]
        if raw[0] != raw[1] and np.round(raw[0], 5) == np.round(raw[1], 5):
            near = candidate
            break
    assert near is not None
    results = list(METHOD.correct([base, near], SafeLoraConfig(select="number", num_layers=1)))
    assert results[0].report["safelora_cos"] == results[1].report["safelora_cos"]
    assert all(res.report["projected"] for res in results)


def test_projected_B_is_D_DtB_over_norm_and_distance_terms():
    module = make_module(0, 7, 6, 2, seed=3)
    result = METHOD.correct_module(module, SafeLoraConfig(select="threshold", threshold=1.0))
    D = module.displacement.double()
    assert result.report["projected"] is True
    assert torch.allclose(result.update.B, D @ D.T @ module.update.B / D.norm(), atol=1e-10)
    assert result.report["safelora_dist"] == 1.0
    kept = METHOD.correct_module(module, SafeLoraConfig(select="threshold", threshold=-1.0))
    assert kept.report["projected"] is False and kept.update is module.update
    gap = float((module.update.B - D @ D.T @ module.update.B / D.norm()).norm())
    assert kept.report["safelora_dist"] == pytest.approx(1 / (1 + gap))


def test_float32_and_bf16_displacements_match_float64_to_their_precision():
    module = make_module(0, 40, 30, 4, seed=8)
    reference = METHOD.correct_module(module, SafeLoraConfig(select="threshold", threshold=1.0))
    D = module.displacement
    for low, tol in ((D.float(), 1e-5), (D.bfloat16(), 1e-2)):
        module.displacement = low
        result = METHOD.correct_module(module, SafeLoraConfig(select="threshold", threshold=1.0))
        D_low = low.double()
        expected = D_low @ (D_low.T @ module.update.B) / D_low.norm()
        assert torch.allclose(result.update.B, expected, rtol=tol, atol=tol * float(expected.abs().max()))
        assert result.report["safelora_cos"] == pytest.approx(reference.report["safelora_cos"], abs=tol)


def test_zero_displacement_layer_is_unchanged_with_null_cosine():
    zero = make_module(0, 6, 5, 2, seed=1, D=torch.zeros(6, 5))
    normal = make_module(1, 6, 5, 2, seed=2)
    for projection in ("approx", "exact"):
        config = SafeLoraConfig(select="number", num_layers=5, projection=projection)
        results = list(METHOD.correct([zero, normal], config))
        assert results[0].update is zero.update
        assert results[0].report["safelora_cos"] is None and results[0].report["projected"] is False
        assert results[0].report["safelora_dist"] is None
        assert results[1].report["projected"] is True  # the only ranked layer
        summary = METHOD.summary(results, config)
        assert summary["num_undefined"] == 1 and summary["pdst"] == 1.0
        for value in results[0].report.values():
            assert not (isinstance(value, float) and math.isnan(value))


def test_zero_update_layer_is_unchanged_with_null_cosine():
    module = make_module(0, 6, 5, 2, seed=1, B=torch.zeros(6, 2, dtype=torch.float64))
    result = METHOD.correct_module(module, SafeLoraConfig(select="threshold", threshold=1.0))
    assert result.update is module.update and result.report["safelora_cos"] is None


def test_all_layers_undefined_gives_no_threshold():
    modules = [make_module(i, 4, 4, 1, seed=i, D=torch.zeros(4, 4)) for i in range(2)]
    config = SafeLoraConfig()
    results = list(METHOD.correct(modules, config))
    assert not any(res.report["projected"] for res in results)
    assert METHOD.summary(results, config) == {
        "pdst": None, "safelora_threshold": None, "num_projected": 0, "num_modules": 2, "num_undefined": 2,
    }


def test_approx_without_displacement_is_refused_with_a_hint():
    module = make_module(0, 5, 4, 2, seed=1)
    module.displacement = None
    with pytest.raises(OptionError, match="--projection exact"):
        list(METHOD.correct([module], SafeLoraConfig()))
    with pytest.raises(OptionError) as caught:
        METHOD.check_sources(SafeLoraConfig(), has_displacement=False, has_subspace=True)
    assert str(caught.value) == APPROX_NEEDS_D
    exact = SafeLoraConfig(projection="exact")
    METHOD.check_sources(exact, has_displacement=False, has_subspace=True)
    assert METHOD.needs_subspace(exact) and not METHOD.needs_displacement(exact)
    assert not METHOD.needs_subspace(SafeLoraConfig()) and METHOD.needs_displacement(SafeLoraConfig())
    result = METHOD.correct_module(module, SafeLoraConfig(projection="exact", select="threshold"))
    assert result.report["d_source"] == "rank-k"


def test_number_mode_reads_each_module_once():
    reads = []

    def stream():
        for i in range(3):
            reads.append(i)
            yield make_module(i, 5, 4, 2, seed=i)

    results = list(METHOD.correct(stream(), SafeLoraConfig(num_layers=1)))
    assert reads == [0, 1, 2] and len(results) == 3


def record_measurements(monkeypatch) -> list:
    """Every item ``SafeLora._measure`` returns, in order (number mode's held state, inspected)."""
    measured = []
    original = SafeLora._measure

    def recording(self, module, config):
        item = original(self, module, config)
        measured.append(item)
        return item

    monkeypatch.setattr(SafeLora, "_measure", recording)
    return measured


def test_number_mode_keeps_C_B_only_for_modules_that_can_still_be_projected(monkeypatch):
    """Memory flat in depth (docs/benchmarks.md): a module whose cosine is above the running
    N-th smallest can never be projected, so its C B (m x r) is dropped when that is known."""
    measured = record_measurements(monkeypatch)
    modules = [make_module(i, 12, 10, 2, seed=i) for i in range(12)]
    holding = []

    def stream():
        for module in modules:
            yield module
            holding.append(sum(item.projected_B is not None for item in measured))  # after its measurement

    config = SafeLoraConfig(select="number", num_layers=3)
    results = list(METHOD.correct(stream(), config))
    assert max(holding) == 3 and holding[:3] == [1, 2, 3]
    # the same result as deciding at the end with every C B kept: threshold mode at the final cut
    cut = sorted(r.report["safelora_cos"] for r in results)[2]
    monkeypatch.undo()
    expected = [METHOD.correct_module(m, SafeLoraConfig(select="threshold", threshold=cut)) for m in modules]
    for got, want in zip(results, expected, strict=True):
        assert got.report["projected"] == want.report["projected"]
        assert got.report["safelora_dist"] == want.report["safelora_dist"]
        assert torch.equal(got.update.B, want.update.B)
    assert sum(r.report["projected"] for r in results) == 3


def test_number_mode_holds_float32_factors_and_gives_back_the_same_float64(monkeypatch):
    """issue 15: factors read from an fp32 file are held in float32 until the threshold is
    known (half the bytes); the results are the float64 values given, bit for bit. Factors
    float32 cannot hold exactly stay float64."""
    measured = record_measurements(monkeypatch)
    modules = [make_module(i, 12, 10, 2, seed=i) for i in range(4)]
    for module in modules[:3]:  # as read from an fp32 adapter
        module.update = LoraUpdate(
            A=module.update.A.float().double(), B=module.update.B.float().double(), scale=module.update.scale
        )
    held = []

    def stream():
        for module in modules:
            yield module
            held.append(measured[-1].update.A.dtype)  # while the threshold is not yet known

    results = list(METHOD.correct(stream(), SafeLoraConfig(select="number", num_layers=1)))
    assert held == [torch.float32] * 3 + [torch.float64]
    assert all(r.update.A.dtype == r.update.B.dtype == torch.float64 for r in results)
    for module, result in zip(modules, results, strict=True):
        assert torch.equal(result.update.A, module.update.A)
        if not result.report["projected"]:
            assert torch.equal(result.update.B, module.update.B)


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"select": "top"}, "--select"),
        ({"num_layers": 0}, "--num-layers"),
        ({"num_layers": 2.5}, "--num-layers"),
        ({"threshold": 1.5}, "--threshold"),
        ({"threshold": -1.01}, "--threshold"),
        ({"projection": "svd"}, "--projection"),
    ],
)
def test_option_validation(options, flag):
    with pytest.raises(OptionError, match=flag):
        SafeLoraConfig(**options)
