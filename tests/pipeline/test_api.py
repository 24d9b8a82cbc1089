"""End to end on a real save_pretrained pair and real PEFT adapters.

The check that matters: the corrected folder, loaded by stock ``PeftModel.from_pretrained``
and merged with ``merge_and_unload``, gives the aligned weights plus the update each
method promises, computed here densely from the definitions (docs/design.md §4, §5, §5b) — so the
writer's rank_pattern/alpha_pattern/scaling and the streaming are tested together.
"""

import json

import pytest
import torch

from csulora.references.subspace import build_subspace
from csulora.pipeline.api import AuditReport, CorrectionReport, audit_adapter, correct_adapter
from csulora.errors import InputError, OptionError
from csulora.io.adapters import ADAPTER_WEIGHTS, DEFAULT_REPORT_NAME
from csulora.io.checkpoints import CheckpointReader, read_displacement
from csulora.io.subspace_cache import load_subspace_cache
from tests.fixtures_full import full_world  # noqa: F401
from tests.fixtures_tiny import (  # noqa: F401
    UNTOUCHED_MODULE,
    adapter_variant,
    leftovers,
    merged_weights,
    tiny_adapter,
    tiny_pair,
    tiny_subspace,
)

_WEIGHTS: dict = {}


def aligned_weights(aligned):
    if "aligned" not in _WEIGHTS:
        _WEIGHTS["aligned"] = merged_weights(aligned)
    return _WEIGHTS["aligned"]


def input_updates(aligned, adapter_dir):
    key = ("in", str(adapter_dir))
    if key not in _WEIGHTS:
        base = aligned_weights(aligned)
        merged = merged_weights(aligned, adapter_dir)
        _WEIGHTS[key] = {name: merged[name] - base[name] for name in merged}
    return _WEIGHTS[key]


def displacement(pair, module):
    with CheckpointReader(pair[0]) as b, CheckpointReader(pair[1]) as a:
        return read_displacement(b, a, module).double()


def expected_update(method, options, dW, row, sub, D):
    """The dense update a method promises for one module (from its definition)."""
    U, S, V = sub.U, sub.S, sub.V
    PU, PV = U @ U.T, V @ V.T
    Dk = U @ torch.diag(S) @ V.T
    if method == "scale":
        return options["factor"] * dW
    if method == "resta":
        return dW + options.get("restore", 1.0) * Dk
    if method == "csulora":
        QU, QV = torch.eye(PU.shape[0], dtype=dW.dtype) - PU, torch.eye(PV.shape[0], dtype=dW.dtype) - PV
        F = PU @ dW @ PV
        P = PU @ dW @ QV + QU @ dW @ PV
        O = QU @ dW @ QV
        return F + row["c_P"] * P + row["c_O"] * O + options.get("restore", 0.0) * Dk
    if method == "safelora":
        if not row["projected"]:
            return dW
        C = PU if options.get("projection") == "exact" else D @ D.T / D.norm()
        return C @ dW
    raise AssertionError(method)


def check_merge(pair, adapter_dir, out_dir, report, method, options, cache, rtol=1e-5):
    base = aligned_weights(pair[1])
    merged = merged_weights(pair[1], out_dir)
    dWs = input_updates(pair[1], adapter_dir)
    rows = {row["module"]: row for row in report.modules}
    assert rows, "no module corrected"
    for name, row in rows.items():
        expected = expected_update(method, options, dWs[name], row, cache.get(name), displacement(pair, name))
        got = merged[name] - base[name]
        scale = float(expected.abs().max()) or 1.0
        assert torch.allclose(got, expected, rtol=0, atol=rtol * scale), (name, float((got - expected).abs().max()))
    for name in set(merged) - set(rows):  # modules not corrected keep the input's update
        assert torch.allclose(merged[name] - base[name], dWs[name], rtol=0, atol=1e-6)


CASES = [
    ("csulora", {}),
    ("csulora", {"gamma": 4.0, "schedule": "ratio", "restore": 0.5}),
    ("resta", {"restore": 1.5}),
    ("scale", {"factor": 0.3}),
    ("safelora", {"projection": "exact", "select": "threshold", "threshold": 0.35}),
]


@pytest.mark.parametrize("variant", ["patterns", "rslora_patterns"])
@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{len(o)}" for m, o in CASES])
def test_merged_output_equals_aligned_plus_promised_update(
    tmp_path_factory, tmp_path, tiny_pair, tiny_subspace, variant, method, options
):
    adapter_dir = adapter_variant(tmp_path_factory, variant)
    out = tmp_path / "out"
    report = correct_adapter(adapter_dir, out, method, subspace=tiny_subspace, progress=False, **options)
    assert isinstance(report, CorrectionReport)
    check_merge(tiny_pair, adapter_dir, out, report, method, options, load_subspace_cache(tiny_subspace))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("variant", ["plain", "rslora"])
def test_rank_changing_outputs_merge_exactly(tmp_path_factory, tmp_path, tiny_pair, tiny_subspace, variant):
    adapter_dir = adapter_variant(tmp_path_factory, variant)
    options = {"gamma": 2.0, "restore": 0.7}
    report = correct_adapter(adapter_dir, tmp_path / "o", "csulora", subspace=tiny_subspace, progress=False, **options)
    ranks = {row["rank_out"] for row in report.modules}
    assert max(ranks) > max(row["rank_in"] for row in report.modules)
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and all(k.startswith("model.layers.") for k in config["rank_pattern"])
    check_merge(tiny_pair, adapter_dir, tmp_path / "o", report, "csulora", options, load_subspace_cache(tiny_subspace))


def test_safelora_approx_streams_the_exact_displacement(tmp_path, tiny_pair, tiny_adapter, tiny_subspace):
    options = {"select": "number", "num_layers": 2}
    report = correct_adapter(tiny_adapter, tmp_path / "o", "safelora", base=tiny_pair[0], aligned=tiny_pair[1], progress=False, **options)
    assert sum(bool(row["projected"]) for row in report.modules) >= 2
    assert report.d_source == "exact" and "pdst" in report.summary
    check_merge(tiny_pair, tiny_adapter, tmp_path / "o", report, "safelora", options, load_subspace_cache(tiny_subspace))


def test_bf16_adapter_keeps_its_dtype_and_merges(tmp_path_factory, tmp_path, tiny_pair, tiny_subspace):
    adapter_dir = adapter_variant(tmp_path_factory, "bf16")
    from safetensors.torch import load_file

    report = correct_adapter(adapter_dir, tmp_path / "o", "resta", subspace=tiny_subspace, progress=False, restore=1.0)
    assert {t.dtype for t in load_file(str(tmp_path / "o" / ADAPTER_WEIGHTS)).values()} == {torch.bfloat16}
    check_merge(tiny_pair, adapter_dir, tmp_path / "o", report, "resta", {"restore": 1.0},
                load_subspace_cache(tiny_subspace), rtol=2e-2)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reruns_are_byte_identical(tmp_path, tiny_adapter, tiny_subspace):
    for i in range(2):
        correct_adapter(tiny_adapter, tmp_path / f"o{i}", "csulora", subspace=tiny_subspace, progress=False, restore=0.3)
    first, second = _files(tmp_path / "o0"), _files(tmp_path / "o1")
    assert first == second
    assert DEFAULT_REPORT_NAME in first


@pytest.mark.parametrize("method, options", [("csulora", {"gamma": 1.0}), ("resta", {}),
                                             ("safelora", {"projection": "exact"})])
def test_subspace_path_and_base_aligned_path_agree(tmp_path, tiny_pair, tiny_adapter, tiny_subspace, method, options):
    a = correct_adapter(tiny_adapter, tmp_path / "cache", method, subspace=tiny_subspace, progress=False, **options)
    b = correct_adapter(tiny_adapter, tmp_path / "pair", method, base=tiny_pair[0], aligned=tiny_pair[1],
                        progress=False, **options)
    assert (tmp_path / "cache" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "pair" / ADAPTER_WEIGHTS).read_bytes()
    assert a.d_source == "rank-k" and b.d_source == "exact"
    for ra, rb in zip(a.modules, b.modules):
        assert ra["rho_F"] == pytest.approx(rb["rho_F"], abs=1e-12)
        assert ra["dw_over_d"] == pytest.approx(rb["dw_over_d"], rel=1e-6)  # exact ||D|| is cached


def test_cache_and_pair_together_are_checked_against_each_other(tmp_path, tiny_pair, tiny_adapter, tiny_subspace):
    report = correct_adapter(tiny_adapter, tmp_path / "ok", "csulora", subspace=tiny_subspace,
                             base=tiny_pair[0], aligned=tiny_pair[1], progress=False)
    assert report.d_source == "exact"
    swapped = build_subspace(tiny_pair[1], tiny_pair[0], tmp_path / "swapped.safetensors", progress=False)
    with pytest.raises(InputError, match="different base/aligned pair"):
        correct_adapter(tiny_adapter, tmp_path / "bad", "csulora", subspace=swapped,
                        base=tiny_pair[0], aligned=tiny_pair[1], progress=False)
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


def test_audit_reports_every_module_from_either_source(tmp_path_factory, tiny_pair, tiny_subspace):
    adapter_dir = adapter_variant(tmp_path_factory, "rslora_patterns")  # includes the untouched k_proj
    cached = audit_adapter(adapter_dir, subspace=tiny_subspace, progress=False)
    exact = audit_adapter(adapter_dir, base=tiny_pair[0], aligned=tiny_pair[1], progress=False)
    assert isinstance(cached, AuditReport)
    assert [r["module"] for r in cached.modules] == [r["module"] for r in exact.modules]
    assert len(cached.modules) == 6
    rows = {r["module"]: r for r in exact.modules}
    empty = rows[UNTOUCHED_MODULE]
    assert empty["subspace_rank"] == 0 and empty["rho_O"] == pytest.approx(1.0)
    assert empty["safelora_cos"] is None and empty["cos_dW_D"] is None
    dWs = input_updates(tiny_pair[1], adapter_dir)
    for row in exact.modules:
        if row["module"] == UNTOUCHED_MODULE:
            continue
        D = displacement(tiny_pair, row["module"])
        dW = dWs[row["module"]]
        cos = float((dW * D).sum() / (dW.norm() * D.norm()))
        assert row["cos_dW_D"] == pytest.approx(cos, abs=1e-5)
        assert row["dw_over_d"] == pytest.approx(float(dW.norm() / D.norm()), rel=1e-5)
        assert row["rho_F"] + row["rho_P"] + row["rho_O"] == pytest.approx(1.0)
    data = json.loads(exact.to_json())
    assert data["kind"] == "audit" and data["d_source"] == "exact" and len(data["modules"]) == 6
    table = cached.format_table()
    assert UNTOUCHED_MODULE in table and "rho_F" in table


def test_audit_changes_nothing(tmp_path, tiny_adapter, tiny_subspace):
    before = _files(tiny_adapter)
    audit_adapter(tiny_adapter, subspace=tiny_subspace, progress=False)
    assert _files(tiny_adapter) == before
    assert sorted(p.name for p in tiny_subspace.parent.iterdir()) == [tiny_subspace.name]


def test_targets_restrict_the_correction(tmp_path, tiny_adapter, tiny_subspace, tiny_pair):
    report = correct_adapter(tiny_adapter, tmp_path / "o", "scale", subspace=tiny_subspace, progress=False,
                             factor=0.0, targets=["v_proj"])
    assert {r["module"].rsplit(".", 1)[1] for r in report.modules} == {"v_proj"}
    check_merge(tiny_pair, tiny_adapter, tmp_path / "o", report, "scale", {"factor": 0.0},
                load_subspace_cache(tiny_subspace))


def test_options_are_validated_before_anything_is_read(tmp_path):
    missing = tmp_path / "no-adapter"
    with pytest.raises(OptionError, match="--gamma"):
        correct_adapter(missing, tmp_path / "o", "csulora", subspace=missing, gamma=-1.0)
    with pytest.raises(OptionError, match="--threshold"):
        correct_adapter(missing, tmp_path / "o", "safelora", subspace=missing, threshold=1.5)
    with pytest.raises(OptionError, match="does not apply to --method scale"):
        correct_adapter(missing, tmp_path / "o", "scale", subspace=missing, factor=0.5, gamma=1.0)
    with pytest.raises(OptionError, match="--method"):
        correct_adapter(missing, tmp_path / "o", "nope", subspace=missing)
    with pytest.raises(OptionError, match="exact D"):
        correct_adapter(missing, tmp_path / "o", "safelora", subspace=missing)
    with pytest.raises(OptionError, match="--base needs --aligned ALIGNED too"):
        correct_adapter(missing, tmp_path / "o", "resta", base=missing)
    assert list(tmp_path.iterdir()) == []


def test_report_path_inside_or_outside_outdir(tmp_path, tiny_adapter, tiny_subspace):
    inside = tmp_path / "o" / "reports" / "r.json"
    correct_adapter(tiny_adapter, tmp_path / "o", "scale", subspace=tiny_subspace, progress=False, factor=0.5,
                    report_path=inside)
    assert json.loads(inside.read_text())["method"] == "scale"
    assert not (tmp_path / "o" / DEFAULT_REPORT_NAME).exists()
    outside = tmp_path / "elsewhere" / "r.json"
    correct_adapter(tiny_adapter, tmp_path / "o2", "scale", subspace=tiny_subspace, progress=False, factor=0.5,
                    report_path=outside, targets="q_proj")
    assert len(json.loads(outside.read_text())["modules"]) == 2
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "elsewhere") == []


def test_streaming_holds_one_displacement_at_a_time(tiny_pair, tiny_adapter):
    """The module stream drops each D before reading the next pair (never two models)."""
    import gc
    import weakref
    from contextlib import ExitStack

    from csulora.pipeline.correction import open_correction
    from csulora.pipeline.options import SourcePaths

    with ExitStack() as stack:
        audit = open_correction(stack, tiny_adapter, None, paths=SourcePaths(base=tiny_pair[0], aligned=tiny_pair[1]))
        stream = audit.inputs(audit.modules, progress=False, desc="t")
        first = next(stream)
        assert first.displacement is not None and first.subspace is not None
        ref = weakref.ref(first.displacement)
        del first
        second = next(stream)
        gc.collect()
        assert ref() is None
        assert second.displacement is not None


def test_hub_id_naming_a_full_checkpoint_takes_the_dense_path(tmp_path, monkeypatch, full_world):  # noqa: F811
    """A hub id is resolved before the input's kind is read: a full fine-tune on the hub was
    taken for an adapter ("no adapter_config.json") when the kind was asked of the id itself."""
    from tests.io.test_hub import use_fake_hub

    w = full_world
    repos = {"tiny-org/finetuned": w.ft, "tiny-org/aligned": w.aligned, "tiny-org/base": w.base}
    use_fake_hub(monkeypatch, tmp_path / "hub", repos)
    audit = audit_adapter("tiny-org/finetuned", base="tiny-org/base", aligned="tiny-org/aligned", progress=False)
    assert audit.untargeted is not None and audit.summary["modules"] > 0  # the checkpoint's audit
    out = tmp_path / "out"
    correct_adapter("tiny-org/finetuned", out, "scale", aligned="tiny-org/aligned", progress=False, factor=0.5)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "adapter_config.json").exists()
    with CheckpointReader(out) as corrected, CheckpointReader(full_world.ft) as ft, \
            CheckpointReader(full_world.aligned) as aligned:
        name = "model.layers.0.self_attn.q_proj.weight"
        expected = aligned.get(name) + 0.5 * (ft.get(name) - aligned.get(name))
        torch.testing.assert_close(corrected.get(name), expected)
