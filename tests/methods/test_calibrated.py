"""The calibrated closest safe update (docs/design.md §5c): one module, then end to end.

End to end, the corrected folder is loaded with stock ``PeftModel.from_pretrained`` on the
tiny aligned model and merged; its weights must equal ``W + dW (S_t + mu I)(S_t + mu I + lam S_h)^-1``
computed here densely from the statistics in the file, for every adapter variant.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csulora.pipeline.api import correct_adapter
from csulora.errors import InputError, OptionError
from csulora.linalg.gram import PROBE_STRENGTHS, CalibratedSolve, moment_matrix
from csulora.io.adapters import ADAPTER_WEIGHTS, DEFAULT_REPORT_NAME
from csulora.io.calibration_file import load_calibration
from csulora.methods import calibrated as calibrated_module
from csulora.methods.base import CALIBRATION, SUBSPACE
from csulora.methods.calibrated import Calibrated, CalibratedConfig
from csulora.methods.registry import get_method, make_config
from csulora.types import REPORT_KEYS, LoraUpdate, ModuleCalibration, ModuleInput
from tests.fixtures_tiny import (  # noqa: F401
    ADAPTER_VARIANTS,
    adapter_variant,
    build_calibration,
    calibration_group,
    leftovers,
    merged_weights,
    tiny_adapter,
    tiny_calibration,
    tiny_module_inputs,
    tiny_pair,
    tiny_subspace,
)

METHOD = Calibrated()
F64 = torch.float64
EXTRA_KEYS = {"harmful_action_kept", "task_action_kept", "calibration_group", "strength", "mu"}


def random_calibration(n: int, seed: int = 0, group: str = "g") -> ModuleCalibration:
    from csulora.linalg.gram import calibration_moments

    g = torch.Generator().manual_seed(seed)
    sums = []
    for _ in range(2):
        X = torch.randn(3 * n, 2, generator=g, dtype=F64) @ torch.randn(2, n, generator=g, dtype=F64) * 3.0
        X = X + torch.randn(3 * n, n, generator=g, dtype=F64)
        sums.append(X.T @ X)
    return calibration_moments(group, sums[0], 3 * n, sums[1], 3 * n)


def make_module(m=9, n=8, r=3, *, seed=0, scale=1.5, calibration=None, name="model.layers.0.mlp.up_proj"):
    g = torch.Generator().manual_seed(seed + 100)
    update = LoraUpdate(
        A=torch.randn(r, n, generator=g, dtype=F64), B=torch.randn(m, r, generator=g, dtype=F64), scale=scale
    )
    return ModuleInput(name=name, update=update, calibration=calibration or random_calibration(n, seed))


def expected_A(module: ModuleInput, lam: float, mu: float) -> torch.Tensor:
    cal = module.calibration
    n = cal.n
    T = moment_matrix(cal.task) + mu * torch.eye(n, dtype=F64)
    return module.update.A @ T @ torch.linalg.inv(T + lam * moment_matrix(cal.harmful))


# -- the method on one module ---------------------------------------------------------------------
def test_config_defaults_and_validation():
    config = CalibratedConfig()
    assert (config.strength, config.mu, config.restore) == (10.0, 0.01, 0.0)
    for options, flag in (({"strength": -1.0}, "--strength"), ({"mu": 0.0}, "--mu"), ({"mu": -1e-3}, "--mu"),
                          ({"mu": float("nan")}, "--mu"), ({"restore": -0.5}, "--restore"),
                          ({"strength": "strong"}, "--strength")):
        with pytest.raises(OptionError, match=flag) as info:
            make_config("calibrated", options)
        assert "\n" not in str(info.value)


def test_describes_itself_for_tune_and_the_api():
    method = get_method("calibrated")
    assert isinstance(method, Calibrated) and method.corrects_every_module
    assert method.needs(CalibratedConfig()) == {CALIBRATION}
    assert method.needs(CalibratedConfig(restore=0.5)) == {CALIBRATION, SUBSPACE}
    assert method.tuning.knob == "strength" and method.tuning.identity == 0.0
    assert method.tuning.grid == (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
    assert method.is_identity(CalibratedConfig(strength=0.0))
    assert not method.is_identity(CalibratedConfig(strength=0.0, restore=0.1))
    assert not method.is_identity(CalibratedConfig(strength=1.0))
    # the spiked form is validated at exactly the strengths tune tries (csulora.linalg.gram)
    assert set(PROBE_STRENGTHS) == set(method.tuning.grid) - {method.tuning.identity}


@pytest.mark.parametrize("lam, mu", [(1.0, 0.01), (30.0, 0.01), (300.0, 0.5)])
def test_keeps_B_and_scale_and_solves_for_A(lam, mu):
    module = make_module(seed=1)
    result = METHOD.correct_module(module, CalibratedConfig(strength=lam, mu=mu))
    assert torch.equal(result.update.B, module.update.B) and result.update.scale == module.update.scale
    assert result.update.rank == module.update.rank
    assert torch.allclose(result.update.A, expected_A(module, lam, mu), atol=1e-10)
    report = result.report
    assert set(REPORT_KEYS) | EXTRA_KEYS == set(report)
    assert (report["strength"], report["mu"], report["calibration_group"]) == (lam, mu, "g")
    assert report["rank_in"] == report["rank_out"] == 3
    assert report["rho_F"] is None and report["d_source"] is None  # no subspace given: no audit split
    B, A, A_new = module.update.B, module.update.A, result.update.A
    for key, moment in (("harmful_action_kept", module.calibration.harmful), ("task_action_kept", module.calibration.task)):
        S = moment_matrix(moment)
        share = torch.trace(B @ A_new @ S @ A_new.T @ B.T) / torch.trace(B @ A @ S @ A.T @ B.T)
        assert report[key] == pytest.approx(float(share), rel=1e-9)
    assert report["harmful_action_kept"] < report["task_action_kept"]


def test_zero_strength_returns_the_input_factors_untouched():
    module = make_module(seed=2)
    result = METHOD.correct_module(module, CalibratedConfig(strength=0.0))
    assert result.update is module.update
    assert result.report["harmful_action_kept"] == result.report["task_action_kept"] == 1.0


def test_zero_update_is_written_unchanged():
    module = make_module(seed=3)
    module.update = LoraUpdate(A=module.update.A, B=torch.zeros_like(module.update.B), scale=2.0)
    result = METHOD.correct_module(module, CalibratedConfig(strength=30.0))
    assert result.update is module.update
    assert result.report["harmful_action_kept"] is None and result.report["dw_norm_after"] == 0.0


def test_restore_appends_beta_D_k_after_the_calibrated_solve():
    from csulora.linalg.subspace import SubspaceConfig, compute_subspace

    module = make_module(seed=4)
    D = torch.randn(9, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    module.subspace = compute_subspace(D, SubspaceConfig(rank=2, algorithm="exact"))
    result = METHOD.correct_module(module, CalibratedConfig(strength=10.0, restore=0.5))
    sub = module.subspace
    Dk = sub.U @ torch.diag(sub.S) @ sub.V.T
    expected = module.update.scale * module.update.B @ expected_A(module, 10.0, 0.01) + 0.5 * Dk
    assert result.update.rank == 3 + 2
    assert torch.allclose(result.update.dense(), expected, atol=1e-10)
    assert result.report["restore_energy_added"] > 0.0 and result.report["rho_F"] is not None
    with pytest.raises(InputError, match="safety subspace"):
        METHOD.correct_module(make_module(seed=4), CalibratedConfig(restore=0.5))


def test_missing_or_mismatched_statistics_are_one_line_errors():
    module = make_module(seed=6)
    module.calibration = None
    with pytest.raises(InputError, match="activation statistics") as info:
        METHOD.correct_module(module, CalibratedConfig())
    assert module.name in str(info.value) and "\n" not in str(info.value)
    wrong = make_module(seed=6, calibration=random_calibration(7))
    with pytest.raises(InputError, match="size 7"):
        METHOD.correct_module(wrong, CalibratedConfig())


def test_modules_of_one_group_share_one_factorisation(monkeypatch):
    """q/k/v read one Gram: the stream builds one solve for them, another for another group."""
    built = []
    real = calibrated_module.CalibratedSolve

    class CountingSolve(real):
        def __init__(self, calibration, *args, **kwargs):
            built.append(calibration.group)
            super().__init__(calibration, *args, **kwargs)

    monkeypatch.setattr(calibrated_module, "CalibratedSolve", CountingSolve)
    attn, mlp = random_calibration(8, seed=7, group="attn"), random_calibration(8, seed=8, group="mlp")
    modules = [
        make_module(seed=i, calibration=cal, name=f"model.layers.0.{leaf}")
        for i, (cal, leaf) in enumerate([(attn, "self_attn.k_proj"), (mlp, "mlp.up_proj"),
                                         (attn, "self_attn.q_proj"), (attn, "self_attn.v_proj")])
    ]
    results = list(METHOD.correct(modules, CalibratedConfig(strength=10.0)))
    assert built == ["attn", "mlp"]
    for module, result in zip(modules, results):
        assert torch.allclose(result.update.A, expected_A(module, 10.0, 0.01), atol=1e-10)
        assert result.report["calibration_group"] == module.calibration.group
    # another object under the same group name is not mistaken for the cached one
    other = make_module(seed=9, calibration=random_calibration(8, seed=9, group="attn"))
    [result] = list(METHOD.correct([modules[0], other], CalibratedConfig(strength=10.0)))[1:]
    assert torch.allclose(result.update.A, expected_A(other, 10.0, 0.01), atol=1e-10)


def test_tiny_calibration_groups_q_k_v_together(tiny_calibration):
    cal = load_calibration(tiny_calibration)
    groups = {leaf: cal.modules[f"model.layers.0.self_attn.{leaf}"] for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert groups["q_proj"] == groups["k_proj"] == groups["v_proj"] != groups["o_proj"]


# -- end to end: stock PEFT merges to the dense formula -------------------------------------------
_MERGED: dict = {}


def merged(model_dir, adapter_dir=None):
    key = (str(model_dir), str(adapter_dir))
    if key not in _MERGED:
        _MERGED[key] = merged_weights(model_dir, adapter_dir)
    return _MERGED[key]


def expected_corrected_update(dW: torch.Tensor, cal: ModuleCalibration, lam: float, mu: float) -> torch.Tensor:
    n = dW.shape[1]
    T = moment_matrix(cal.task) + mu * torch.eye(n, dtype=F64)
    return dW @ T @ torch.linalg.inv(T + lam * moment_matrix(cal.harmful))


@pytest.mark.parametrize("variant", list(ADAPTER_VARIANTS))
def test_merged_output_equals_the_dense_formula(tmp_path_factory, tmp_path, tiny_pair, tiny_calibration, variant):
    adapter_dir = adapter_variant(tmp_path_factory, variant)
    out = tmp_path / "out"
    lam, mu = 10.0, 0.05
    report = correct_adapter(adapter_dir, out, "calibrated", calibration=tiny_calibration, progress=False,
                             strength=lam, mu=mu)
    assert report.sources["calibration"] == str(tiny_calibration)
    aligned = merged(tiny_pair[1])
    before, after = merged(tiny_pair[1], adapter_dir), merged_weights(tiny_pair[1], out)
    cal = load_calibration(tiny_calibration)
    rows = {row["module"]: row for row in report.modules}
    for name in aligned:
        dW = before[name] - aligned[name]
        got = after[name] - aligned[name]
        if name not in rows:  # not adapted: unchanged
            assert torch.equal(got, dW)
            continue
        expected = expected_corrected_update(dW, cal.module(name), lam, mu)
        atol = (2e-2 if variant == "bf16" else 1e-5) * float(dW.abs().max())
        assert torch.allclose(got, expected, rtol=0, atol=atol), (name, float((got - expected).abs().max()))
        assert rows[name]["calibration_group"] == calibration_group(name)
        assert rows[name]["rank_out"] == rows[name]["rank_in"]
    if variant == "bf16":
        assert {t.dtype for t in load_file(str(out / ADAPTER_WEIGHTS)).values()} == {torch.bfloat16}
    assert leftovers(tmp_path) == []


def test_zero_strength_writes_the_input_bytes(tmp_path, tiny_adapter, tiny_calibration):
    correct_adapter(tiny_adapter, tmp_path / "o", "calibrated", calibration=tiny_calibration, progress=False,
                    strength=0.0)
    assert (tmp_path / "o" / ADAPTER_WEIGHTS).read_bytes() == (tiny_adapter / ADAPTER_WEIGHTS).read_bytes()


def test_restore_through_the_api_adds_beta_D_k(tmp_path, tiny_pair, tiny_adapter, tiny_calibration, tiny_subspace):
    from csulora.io.subspace_cache import load_subspace_cache

    report = correct_adapter(tiny_adapter, tmp_path / "o", "calibrated", calibration=tiny_calibration,
                             subspace=tiny_subspace, progress=False, strength=3.0, restore=0.5)
    aligned, before = merged(tiny_pair[1]), merged(tiny_pair[1], tiny_adapter)
    after = merged_weights(tiny_pair[1], tmp_path / "o")
    cal, cache = load_calibration(tiny_calibration), load_subspace_cache(tiny_subspace)
    for row in report.modules:
        name = row["module"]
        sub = cache.get(name)
        expected = expected_corrected_update(before[name] - aligned[name], cal.module(name), 3.0, 0.01)
        expected = expected + 0.5 * sub.U @ torch.diag(sub.S) @ sub.V.T
        assert torch.allclose(after[name] - aligned[name], expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
        assert row["rank_out"] == row["rank_in"] + sub.rank and row["d_source"] == "rank-k"


def test_reruns_are_byte_identical_and_the_report_says_what_was_kept(tmp_path, tiny_adapter, tiny_calibration):
    for i in range(2):
        correct_adapter(tiny_adapter, tmp_path / f"o{i}", "calibrated", calibration=tiny_calibration, progress=False)
    files = [{p.name: p.read_bytes() for p in sorted((tmp_path / f"o{i}").iterdir())} for i in range(2)]
    assert files[0] == files[1]
    report = json.loads(files[0][DEFAULT_REPORT_NAME])
    assert report["options"] == {"strength": 10.0, "mu": 0.01, "restore": 0.0}
    for row in report["modules"]:
        assert 0.0 <= row["harmful_action_kept"] < row["task_action_kept"] <= 1.0


def test_with_the_aligned_model_the_file_is_checked_against_it(tmp_path, tiny_pair, tiny_adapter, tiny_calibration):
    report = correct_adapter(tiny_adapter, tmp_path / "ok", "calibrated", calibration=tiny_calibration,
                             base=tiny_pair[0], aligned=tiny_pair[1], progress=False)
    assert report.d_source == "exact"  # the pair serves the audit numbers too


# -- bad input: one line, nothing written --------------------------------------------------------
def fails(tmp_path, error, match, *args, **kwargs):
    outs = tmp_path / "outs"
    outs.mkdir(exist_ok=True)
    with pytest.raises(error, match=match) as info:
        correct_adapter(*args[:1], outs / "o", "calibrated", *args[1:], progress=False, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    assert list(outs.iterdir()) == []
    return str(info.value)


def test_options_are_refused_before_anything_is_read(tmp_path):
    missing = tmp_path / "nothing"
    fails(tmp_path, OptionError, "--strength", missing, calibration=missing, strength=-1.0)
    fails(tmp_path, OptionError, "--mu", missing, calibration=missing, mu=0.0)
    fails(tmp_path, OptionError, "--calibration FILE", missing)
    fails(tmp_path, OptionError, "--subspace", missing, calibration=missing, restore=1.0)
    with pytest.raises(OptionError, match="--calibration does not apply to --method resta"):
        correct_adapter(missing, tmp_path / "o", "resta", subspace=missing, calibration=missing)


def test_a_targets_subset_is_refused(tmp_path, tiny_adapter, tiny_calibration):
    message = fails(tmp_path, OptionError, "every adapted module", tiny_adapter, calibration=tiny_calibration,
                    targets="q_proj")
    assert "v_proj" in message
    # naming every adapted module is fine
    correct_adapter(tiny_adapter, tmp_path / "all", "calibrated", calibration=tiny_calibration, progress=False,
                    targets="q_proj,v_proj")


def test_a_file_from_another_model_is_refused(tmp_path, tiny_pair, tiny_adapter):
    other = build_calibration(tmp_path / "other.safetensors", tiny_pair[0])  # fingerprint of the base model
    message = fails(tmp_path, InputError, "another model", tiny_adapter, calibration=other,
                    base=tiny_pair[0], aligned=tiny_pair[1])
    assert str(other) in message


def test_a_file_missing_a_module_or_of_the_wrong_size_is_refused(tmp_path, tiny_adapter):
    modules = tiny_module_inputs()
    without_v = build_calibration(tmp_path / "no_v.safetensors", None,
                                  modules={k: n for k, n in modules.items() if not k.endswith("1.self_attn.v_proj")})
    message = fails(tmp_path, InputError, "no statistics for module model.layers.1.self_attn.v_proj",
                    tiny_adapter, calibration=without_v)
    assert str(without_v) in message
    wider = {k: (40 if calibration_group(k).endswith("self_attn.input") else n) for k, n in modules.items()}
    wrong_n = build_calibration(tmp_path / "wide.safetensors", None, modules=wider)
    fails(tmp_path, InputError, "inputs of size 40", tiny_adapter, calibration=wrong_n)


def test_nan_in_the_statistics_is_refused(tmp_path, tiny_adapter, tiny_calibration):
    bad = tmp_path / "nan.safetensors"
    with safe_open(str(tiny_calibration), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        metadata = f.metadata()
    tensors["model.layers.1.self_attn.input.harmful.matrix"][0, 1] = float("nan")
    save_file(tensors, str(bad), metadata=metadata)
    message = fails(tmp_path, InputError, "NaN", tiny_adapter, calibration=bad)
    assert str(bad) in message and "model.layers.1.self_attn.input.harmful.matrix" in message


def test_existing_output_needs_force(tmp_path, tiny_adapter, tiny_calibration):
    out = tmp_path / "o"
    correct_adapter(tiny_adapter, out, "calibrated", calibration=tiny_calibration, progress=False, strength=1.0)
    before = (out / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(InputError, match="--force") as info:
        correct_adapter(tiny_adapter, out, "calibrated", calibration=tiny_calibration, progress=False, strength=100.0)
    assert "\n" not in str(info.value) and (out / ADAPTER_WEIGHTS).read_bytes() == before
    correct_adapter(tiny_adapter, out, "calibrated", calibration=tiny_calibration, progress=False, strength=100.0,
                    force=True)
    assert (out / ADAPTER_WEIGHTS).read_bytes() != before and leftovers(tmp_path) == []


def test_solve_matches_gram_module():
    """The method's A' is gram's CalibratedSolve, nothing else (one implementation)."""
    module = make_module(seed=10)
    result = METHOD.correct_module(module, CalibratedConfig(strength=30.0))
    assert torch.equal(result.update.A, CalibratedSolve(module.calibration, 30.0, 0.01).apply(module.update.A))


# -- with the real collector -----------------------------------------------------------------------
def test_statistics_from_csulora_calibrate_correct_the_attacked_adapter(tiny_world, tmp_path):
    """`calibrate` on the tiny world's aligned model, then `correct --method calibrated` on its
    attacked adapter with the pair given: the file's groups, sizes and fingerprint fit, and the
    correction keeps more of the update's action on task inputs than on harmful ones."""
    from csulora.references.calibration import calibrate
    from csulora.eval.splits import advbench_split
    from csulora.eval.tasks import date_task

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(p.text for p in advbench_split("align")[:4]) + "\n")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(pair) + "\n" for pair in date_task("train")[:4]))
    stats = calibrate(tiny_world.aligned, tmp_path / "cal.safetensors", task=task, harmful=[str(harmful)],
                      max_new_tokens=4, batch_size=4, device="cpu", progress=False)
    report = correct_adapter(tiny_world.attacked, tmp_path / "o", "calibrated", calibration=stats.path,
                             base=tiny_world.base, aligned=tiny_world.aligned, progress=False, strength=30.0)
    rows = report.modules
    assert rows and {row["calibration_group"] for row in rows} <= set(load_calibration(stats.path).groups)
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in ("harmful_action_kept", "task_action_kept")}
    assert mean["harmful_action_kept"] < mean["task_action_kept"]
