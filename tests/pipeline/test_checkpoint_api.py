"""Full fine-tunes end to end (docs/design.md §5d): audit and correct a checkpoint folder.

The checks that matter: the corrected folder, loaded by stock
``AutoModelForCausalLM.from_pretrained``, holds ``W_aligned + X`` for every target module
with ``X`` computed here densely, in float64, from each method's definition; every other
tensor is the fine-tuned one byte for byte (or the aligned one with ``reset_others``); the
shard layout, index and side files are the input's; bad input is one line and writes nothing.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from csulora.pipeline.api import audit_adapter, correct_adapter
from csulora.errors import InputError, OptionError
from csulora.io.checkpoints import CheckpointReader, read_displacement
from csulora.io.subspace_cache import round_trip
from csulora.linalg.subspace import SubspaceConfig, compute_subspace
from tests.fixtures_full import (  # noqa: F401 - fixtures
    SIDE_FILES,
    copy_checkpoint,
    full_world,
    read_tensors,
    shard_names,
    weight_map,
)
from tests.fixtures_tiny import UNTOUCHED_MODULE, leftovers, tiny_calibration, tiny_pair, tiny_subspace  # noqa: F401

METHOD_OPTIONS = {
    "scale": {"factor": 0.4},
    "resta": {"restore": 1.5},
    "csulora": {"gamma": 4.0, "restore": 0.5},
    "safelora": {"select": "threshold", "threshold": 0.3},
}


def modules_of(folder) -> list[str]:
    with CheckpointReader(folder) as reader:
        return [n[: -len(".weight")] for n in reader.keys() if ".layers." in n and n.endswith("proj.weight")]


def dense_inputs(world, module, *, ft=None, aligned=None):
    """dW, D and the (float32 round-tripped) subspace of one module, as float64."""
    ft, aligned = ft or world.ft, aligned or world.aligned
    with CheckpointReader(ft) as f, CheckpointReader(aligned) as a, CheckpointReader(world.base) as b:
        dW = read_displacement(a, f, module)
        D = read_displacement(b, a, module)
    sub = round_trip(compute_subspace(D, SubspaceConfig()))
    return dW.double(), D.double(), sub


def parts(dW, U, V):
    PU, PV = U @ U.T, V @ V.T
    QU, QV = torch.eye(PU.shape[0], dtype=dW.dtype) - PU, torch.eye(PV.shape[0], dtype=dW.dtype) - PV
    return PU @ dW @ PV, PU @ dW @ QV + QU @ dW @ PV, QU @ dW @ QV


def expected_update(method, options, dW, D, sub):
    """The dense X each method promises (docs/design.md §5d), from its definition."""
    U, S, V = sub.U.double(), sub.S.double(), sub.V.double()
    Dk = U @ torch.diag(S) @ V.T
    if method == "scale":
        return options["factor"] * dW
    if method == "resta":
        return dW + options["restore"] * D
    if method == "csulora":
        F, P, O = parts(dW, U, V)  # noqa: E741
        total = float(dW.square().sum())
        lam_P, lam_O = options["gamma"] * float(P.square().sum()) / total, options["gamma"] * float(O.square().sum()) / total
        return F + P / (1 + lam_P) + O / (1 + lam_O) + options.get("restore", 0.0) * Dk
    if method == "safelora":
        if float(D.square().sum()) == 0.0:
            return dW
        C = D @ D.T / D.norm()
        projected = C @ dW
        cos = round(float((projected * dW).sum() / (projected.norm() * dW.norm())), 5)
        return projected if cos <= options["threshold"] else dW
    raise ValueError(method)


def corrected(world, tmp_path, method, **options):
    out = tmp_path / f"out-{method}"
    report = correct_adapter(
        world.ft, out, method, aligned=world.aligned, base=world.base, progress=False, **options
    )
    return out, report


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_method_writes_the_dense_formula_and_loads_in_transformers(full_world, tmp_path, method):
    from transformers import AutoModelForCausalLM

    options = METHOD_OPTIONS[method]
    out, report = corrected(full_world, tmp_path, method, **options)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    ft, al = read_tensors(full_world.ft), read_tensors(full_world.aligned)
    for module in modules_of(full_world.ft):
        dW, D, sub = dense_inputs(full_world, module)
        want = al[f"{module}.weight"].double() + expected_update(method, options, dW, D, sub)
        torch.testing.assert_close(params[f"{module}.weight"], want, atol=2e-6, rtol=1e-5, msg=module)
    written = read_tensors(out)
    for name, tensor in ft.items():
        if not name.endswith("proj.weight"):
            assert torch.equal(written[name], tensor), name  # untargeted: the fine-tuned bytes
    rows = {row["module"]: row for row in report.modules}
    assert set(rows) == set(modules_of(full_world.ft))
    assert report.to_dict()["input"] == "checkpoint"
    assert all(row["dw_norm_after"] is not None for row in rows.values())


def calibrated_update(calibration_file, module, dW, strength, mu=0.01):
    from csulora.linalg.gram import moment_matrix
    from csulora.io.calibration_file import load_calibration

    stats = load_calibration(calibration_file).module(module)
    S_h, S_t = moment_matrix(stats.harmful), moment_matrix(stats.task)
    T = S_t + mu * torch.eye(S_t.shape[0], dtype=torch.float64)
    return dW @ T @ torch.linalg.inv(T + strength * S_h)


def test_calibrated_writes_its_dense_formula(full_world, tmp_path, tiny_calibration):  # noqa: F811
    from transformers import AutoModelForCausalLM

    out = tmp_path / "calibrated"
    report = correct_adapter(
        full_world.ft, out, "calibrated", aligned=full_world.aligned, calibration=tiny_calibration,
        strength=10.0, progress=False,
    )  # fmt: skip
    params = dict(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).named_parameters())
    al = read_tensors(full_world.aligned)
    for module in modules_of(full_world.ft):
        dW, _, _ = dense_inputs(full_world, module)
        want = al[f"{module}.weight"].double() + calibrated_update(tiny_calibration, module, dW, 10.0)
        torch.testing.assert_close(params[f"{module}.weight"].detach().double(), want, atol=2e-6, rtol=1e-5)
    row = report.modules[0]
    assert 0.0 <= row["harmful_action_kept"] < row["task_action_kept"] <= 1.0
    assert report.sources["calibration"] == str(tiny_calibration)
    with pytest.raises(OptionError, match="must correct every linear layer"):
        correct_adapter(full_world.ft, tmp_path / "o", "calibrated", aligned=full_world.aligned,
                           calibration=tiny_calibration, targets="q_proj", progress=False)  # fmt: skip


def test_unchanged_modules_are_the_fine_tuned_bytes(full_world, tmp_path):
    # resta adds beta * D: the module alignment left alone (D == 0) is written as fine-tuned.
    out, report = corrected(full_world, tmp_path, "resta", restore=1.0)
    name = f"{UNTOUCHED_MODULE}.weight"
    assert torch.equal(read_tensors(out)[name], read_tensors(full_world.ft)[name])
    out2, _ = corrected(full_world, tmp_path / "identity", "scale", factor=1.0)
    assert read_tensors(out2).keys() == read_tensors(full_world.ft).keys()
    assert all(torch.equal(read_tensors(out2)[n], t) for n, t in read_tensors(full_world.ft).items())


def test_logits_equal_the_dense_formula(full_world, tmp_path):
    from transformers import AutoModelForCausalLM

    options = METHOD_OPTIONS["csulora"]
    out, _ = corrected(full_world, tmp_path, "csulora", **options)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    want = AutoModelForCausalLM.from_pretrained(full_world.ft, dtype=torch.float64)
    al = read_tensors(full_world.aligned)
    with torch.no_grad():
        params = dict(want.named_parameters())
        for module in modules_of(full_world.ft):
            dW, D, sub = dense_inputs(full_world, module)
            params[f"{module}.weight"].copy_(al[f"{module}.weight"].double() + expected_update("csulora", options, dW, D, sub))
        ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)


def test_shard_layout_index_and_side_files_are_kept(full_world, tmp_path):
    out, _ = corrected(full_world, tmp_path, "scale", factor=0.5)
    assert len(shard_names(full_world.ft)) > 2
    assert shard_names(out) == shard_names(full_world.ft)
    assert weight_map(out) == weight_map(full_world.ft)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_tensors(out).values())
    for name in ("config.json", "generation_config.json", *SIDE_FILES):
        assert (out / name).read_bytes() == (full_world.ft / name).read_bytes(), name
    for shard in shard_names(out):  # the same tensors in each shard, in the same order
        with open(out / shard, "rb") as a, open(full_world.ft / shard, "rb") as b:
            assert list(_header(a)) == list(_header(b))


def _header(handle):
    import struct

    (length,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(length))
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def test_single_file_checkpoint_stays_single(full_world, tmp_path):
    out = tmp_path / "single"
    correct_adapter(full_world.ft_single, out, "scale", aligned=full_world.aligned, factor=0.5, progress=False)
    assert shard_names(out) == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()


def test_reset_others_copies_the_aligned_tensors(full_world, tmp_path):
    out, report = corrected(full_world, tmp_path, "scale", factor=0.5, reset_others=True)
    written, al, ft = read_tensors(out), read_tensors(full_world.aligned), read_tensors(full_world.ft)
    others = [n for n in ft if not n.endswith("proj.weight")]
    assert others and all(torch.equal(written[n], al[n]) for n in others)
    assert {row["tensor"] for row in report.untargeted} == set(others)
    assert all(row["written_from"] == "aligned" for row in report.untargeted)
    assert "note" not in report.summary and report.options["reset_others"] is True


def test_targets_restrict_the_correction(full_world, tmp_path):
    out, report = corrected(full_world, tmp_path, "scale", factor=0.5, targets="q_proj")
    written, ft = read_tensors(out), read_tensors(full_world.ft)
    assert [row["module"] for row in report.modules] == [m for m in modules_of(full_world.ft) if m.endswith("q_proj")]
    for name, tensor in ft.items():
        assert torch.equal(written[name], tensor) == ("q_proj" not in name), name
    # the untargeted linear layers are reported as changed tensors the correction leaves alone
    assert any(row["tensor"].endswith("k_proj.weight") and row["changed"] for row in report.untargeted)


def test_bf16_checkpoint_keeps_its_dtype(full_world, tmp_path):
    out = tmp_path / "bf16"
    correct_adapter(full_world.ft_bf16, out, "scale", aligned=full_world.aligned_bf16, factor=0.5, progress=False)
    written, ft, al = read_tensors(out), read_tensors(full_world.ft_bf16), read_tensors(full_world.aligned_bf16)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    name = "model.layers.0.mlp.up_proj.weight"
    want = al[name].float() + 0.5 * (ft[name].float() - al[name].float())
    torch.testing.assert_close(written[name].float(), want, atol=0, rtol=2**-8)  # one bf16 rounding
    assert torch.equal(written["model.norm.weight"], ft["model.norm.weight"])


def test_safelora_number_mode_projects_the_lowest_cosines(full_world, tmp_path):
    _, number = corrected(full_world, tmp_path, "safelora", num_layers=4)
    cosines = sorted(row["safelora_cos"] for row in number.modules if row["safelora_cos"] is not None)
    assert number.summary["safelora_threshold"] == cosines[3]
    projected = {row["module"] for row in number.modules if row["projected"]}
    assert projected == {row["module"] for row in number.modules if row["safelora_cos"] is not None and row["safelora_cos"] <= cosines[3]}
    _, threshold = corrected(full_world, tmp_path / "t", "safelora", select="threshold", threshold=cosines[3])
    assert [row["projected"] for row in threshold.modules] == [row["projected"] for row in number.modules]
    assert number.summary["pdst"] == pytest.approx(threshold.summary["pdst"])
    untouched = next(row for row in number.modules if row["module"] == UNTOUCHED_MODULE)
    assert untouched["safelora_cos"] is None and untouched["projected"] is False


# -- audit --------------------------------------------------------------------------------------
def test_audit_numbers_match_the_dense_definitions(full_world):
    report = audit_adapter(full_world.ft, aligned=full_world.aligned, base=full_world.base, progress=False)
    assert report.summary["safelora_projection"] == "approx" and report.d_source == "exact"
    for row in report.modules:
        dW, D, sub = dense_inputs(full_world, row["module"])
        assert row["dw_norm"] == pytest.approx(float(dW.norm()), rel=1e-6)
        if row["module"] == UNTOUCHED_MODULE:
            assert row["cos_dW_D"] is None and row["safelora_cos"] is None and row["rho_O"] == 1.0
            continue
        F, P, O = parts(dW, sub.U.double(), sub.V.double())  # noqa: E741
        total = float(dW.square().sum())
        for key, part in (("rho_F", F), ("rho_P", P), ("rho_O", O)):
            assert row[key] == pytest.approx(float(part.square().sum()) / total, rel=1e-5, abs=1e-9), key
        assert row["cos_dW_D"] == pytest.approx(float((dW * D).sum() / (dW.norm() * D.norm())), rel=1e-5)
        assert row["dw_over_d"] == pytest.approx(float(dW.norm() / D.norm()), rel=1e-6)
        projected = D @ D.T @ dW
        cos = float((projected * dW).sum() / (projected.norm() * dW.norm()))
        assert row["safelora_cos"] == pytest.approx(round(cos, 5), abs=1e-5)
    ft, al = read_tensors(full_world.ft), read_tensors(full_world.aligned)
    for other in report.untargeted:
        name = other["tensor"]
        want = float((ft[name].double() - al[name].double()).norm() / al[name].double().norm())
        assert other["changed"] and other["rel_change"] == pytest.approx(want, rel=1e-5)
    assert report.summary["untargeted_changed"] == len(report.untargeted) > 0
    assert "--reset-others" in report.summary["note"]


def test_audit_from_a_subspace_cache_uses_the_rank_k_part(full_world, tiny_subspace):  # noqa: F811
    report = audit_adapter(full_world.ft, aligned=full_world.aligned, subspace=tiny_subspace, progress=False)
    assert report.d_source == "rank-k" and report.summary["safelora_projection"] == "exact"
    row = next(r for r in report.modules if r["module"] == "model.layers.0.self_attn.q_proj")
    dW, _, sub = dense_inputs(full_world, row["module"])
    Dk = sub.U.double() @ torch.diag(sub.S.double()) @ sub.V.double().T
    assert row["cos_dW_D"] == pytest.approx(float((dW * Dk).sum() / (dW.norm() * Dk.norm())), rel=1e-4)
    PU = sub.U.double() @ sub.U.double().T
    assert row["safelora_cos"] == pytest.approx(round(float((PU @ dW).norm() / dW.norm()), 5), abs=1e-5)


def test_resta_from_a_cache_alone_adds_the_rank_k_part(full_world, tmp_path, tiny_subspace):  # noqa: F811
    out = tmp_path / "resta-k"
    report = correct_adapter(
        full_world.ft, out, "resta", aligned=full_world.aligned, subspace=tiny_subspace, restore=1.0, progress=False
    )
    assert {row["restore_source"] for row in report.modules} == {"D_k"}
    module = "model.layers.1.mlp.up_proj"
    dW, D, _ = dense_inputs(full_world, module)
    with CheckpointReader(full_world.aligned) as a:
        aligned_w = a.get(f"{module}.weight").double()
    from csulora.io.subspace_cache import load_subspace_cache

    sub = load_subspace_cache(tiny_subspace).get(module)
    Dk = sub.U.double() @ torch.diag(sub.S.double()) @ sub.V.double().T
    torch.testing.assert_close(read_tensors(out)[f"{module}.weight"].double(), aligned_w + dW + Dk, atol=2e-6, rtol=1e-5)


# -- bad input: one line, nothing written ---------------------------------------------------------
def _rewrite_tensor(folder, name, change):
    from safetensors.torch import load_file, save_file

    shard = folder / weight_map(folder)[name]
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(shard), {"format": "pt"})
    return shard


def _fails(world, ft, tmp_path, match, exc=InputError, **kwargs):
    out = tmp_path / "out"
    options = {"aligned": world.aligned, "base": world.base, "factor": 0.5, **kwargs}
    with pytest.raises(exc, match=match) as info:
        correct_adapter(ft, out, "scale", progress=False, **options)
    assert "\n" not in str(info.value)
    assert not out.exists() and leftovers(tmp_path) == []
    return str(info.value)


def test_architecture_that_differs_is_refused(full_world, tmp_path):
    ft = copy_checkpoint(full_world.ft, tmp_path / "src" / "ft")
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    _fails(full_world, ft, tmp_path, r"config.json: different architecture from the aligned model: intermediate_size")


def test_shape_that_differs_is_refused(full_world, tmp_path):
    ft = copy_checkpoint(full_world.ft, tmp_path / "src" / "ft")
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _rewrite_tensor(ft, name, lambda t: t[:, :-1].contiguous())
    _fails(full_world, ft, tmp_path, rf"{shard.name}: tensor {name} has shape \[32, 47\] but the aligned model")


def test_missing_shard_is_refused(full_world, tmp_path):
    ft = copy_checkpoint(full_world.ft, tmp_path / "src" / "ft")
    victim = shard_names(ft)[1]
    (ft / victim).unlink()
    _fails(full_world, ft, tmp_path, rf"shard {victim} is listed but missing")


def test_truncated_shard_is_refused(full_world, tmp_path):
    ft = copy_checkpoint(full_world.ft, tmp_path / "src" / "ft")
    victim = ft / shard_names(ft)[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    _fails(full_world, ft, tmp_path, rf"{victim.name}: truncated or corrupt safetensors file")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_target_is_refused(full_world, tmp_path, bad):
    ft = copy_checkpoint(full_world.ft, tmp_path / "src" / "ft")
    name = "model.layers.1.self_attn.o_proj.weight"  # late in the stream: earlier shards were written
    shard = _rewrite_tensor(ft, name, lambda t: t.index_put((torch.tensor([3]), torch.tensor([5])), torch.tensor(bad)))
    word = "NaN" if bad != bad else "Inf"
    _fails(full_world, ft, tmp_path, rf"{shard.name}: tensor {name} contains {word} values")


def test_pickled_checkpoint_is_refused(full_world, tmp_path):
    ft = tmp_path / "src" / "pickled"
    ft.mkdir(parents=True)
    shutil.copy(full_world.ft / "config.json", ft / "config.json")
    (ft / "pytorch_model.bin").write_bytes(b"not unpickled")
    _fails(full_world, ft, tmp_path, r"only pickled weights found \(pytorch_model.bin\).*safetensors")


def test_existing_output_needs_force(full_world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not empty"):
        correct_adapter(full_world.ft, out, "scale", aligned=full_world.aligned, factor=0.5, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    correct_adapter(full_world.ft, out, "scale", aligned=full_world.aligned, factor=0.5, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_options_are_checked_before_anything_is_read(full_world, tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(OptionError, match=r"give --aligned ALIGNED"):
        correct_adapter(full_world.ft, tmp_path / "o", "scale", aligned=None, factor=0.5)
    with pytest.raises(OptionError, match="Safe LoRA approx needs the exact D"):
        correct_adapter(full_world.ft, tmp_path / "o", "safelora", aligned=full_world.aligned)
    with pytest.raises(OptionError, match="--rank-mode compress does not apply to a full checkpoint"):
        correct_adapter(full_world.ft, tmp_path / "o", "csulora", aligned=full_world.aligned, base=missing,
                        rank_mode="compress")
    with pytest.raises(OptionError, match="give --subspace FILE or --base BASE"):
        audit_adapter(full_world.ft, aligned=full_world.aligned)
    assert not (tmp_path / "o").exists()


def test_api_front_door_dispatches_on_the_input_kind(full_world, tmp_path):
    from csulora.pipeline.api import audit_adapter, correct_adapter

    report = correct_adapter(full_world.ft, tmp_path / "o", "scale", aligned=full_world.aligned, factor=0.5, progress=False)
    assert report.untargeted is not None and (tmp_path / "o" / "config.json").exists()
    audit = audit_adapter(full_world.ft, aligned=full_world.aligned, base=full_world.base, progress=False)
    assert audit.untargeted is not None and len(audit.modules) == 14
