"""The calibration statistics file (docs/design.md §5c): round trip, deterministic bytes, shared
groups, and every bad file as a one-line InputError naming the file (and the tensor)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from csulora.errors import InputError
from csulora.linalg.gram import Eigen, calibration_moments, moment_matrix
from csulora.io.calibration_file import (
    METADATA_KEY,
    MODEL_FINGERPRINT_KEY,
    ROLE_ALIGNED,
    ROLE_UPDATE,
    UPDATE_KEY,
    load_calibration,
    save_calibration,
)
from csulora.io.fingerprint import model_fingerprint
from csulora.types import ModuleCalibration
from tests.fixtures_tiny import (  # noqa: F401
    HIDDEN,
    INTERMEDIATE,
    build_calibration,
    calibration_group,
    leftovers,
    tiny_calibration,
    tiny_module_inputs,
    tiny_pair,
)

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"
DOWN = "model.layers.1.mlp.down_proj"
F64 = torch.float64


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def small_groups(seed: int = 0) -> dict[str, ModuleCalibration]:
    """One dense and one spiked group (n = 10 and 12)."""
    g = torch.Generator().manual_seed(seed)

    def gram_sum(n: int) -> torch.Tensor:
        X = torch.randn(40, n, generator=g, dtype=F64)
        return X.T @ X

    dense = calibration_moments("attn", gram_sum(10), 40, gram_sum(10), 40)
    full = calibration_moments("mlp", gram_sum(12), 40, gram_sum(12), 40)
    spiked = ModuleCalibration(
        "mlp", Eigen.of(moment_matrix(full.harmful)).spiked(4, 40), Eigen.of(moment_matrix(full.task)).spiked(3, 40)
    )
    return {"attn": dense, "mlp": spiked}


SMALL_MODULES = {"l.q_proj": "attn", "l.k_proj": "attn", "l.down_proj": "mlp"}


def edited_copy(src, dst, edit_tensors=None, edit_meta=None):
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


# -- round trip -----------------------------------------------------------------------------------
def test_round_trip_keeps_forms_values_and_metadata(tmp_path):
    groups = small_groups()
    path = save_calibration(tmp_path / "c.safetensors", groups, SMALL_MODULES, {"note": "x", "tokens": [1, 2]})
    cal = load_calibration(path)
    assert cal.path == path and cal.modules == SMALL_MODULES
    assert cal.info == {"note": "x", "tokens": [1, 2]}
    attn, mlp = cal.module("l.q_proj"), cal.module("l.down_proj")
    assert attn.group == "attn" and attn.harmful.is_dense and attn.n == 10
    stored = groups["attn"].harmful.matrix.float().double()
    assert attn.harmful.matrix.dtype == F64 and torch.equal(attn.harmful.matrix, stored)
    assert mlp.group == "mlp" and not mlp.harmful.is_dense and (mlp.harmful.rank, mlp.task.rank) == (4, 3)
    assert torch.equal(mlp.task.U, groups["mlp"].task.U.float().double())
    assert mlp.harmful.sigma2 == groups["mlp"].harmful.sigma2 and mlp.task.tokens == 40
    meta = cal.meta["groups"]["mlp"]
    assert meta["n"] == 12 and meta["harmful"]["form"] == "spiked" and meta["task"]["rank"] == 3
    assert cal.meta["groups"]["attn"]["task"]["form"] == "dense"
    cal.close()


def test_tuple_pairs_are_accepted_and_bytes_are_deterministic(tmp_path):
    groups = small_groups()
    pairs = {name: (c.harmful, c.task) for name, c in groups.items()}
    a = save_calibration(tmp_path / "a.safetensors", groups, SMALL_MODULES, {"b": 1, "a": 2})
    b = save_calibration(tmp_path / "b.safetensors", pairs, dict(reversed(SMALL_MODULES.items())), {"a": 2, "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert leftovers(tmp_path) == []


def test_modules_of_one_group_share_one_read(tiny_calibration):
    cal = load_calibration(tiny_calibration)
    assert calibration_group(Q) == calibration_group(K) == calibration_group(V)
    q = cal.module(Q)
    assert cal.module(K) is q and cal.module(V) is q  # q/k/v: one group, read once
    assert cal.module("model.layers.0.self_attn.o_proj") is not q
    assert cal.module(DOWN).n == INTERMEDIATE and q.n == HIDDEN
    assert len(set(cal.modules.values())) == 2 * 4  # per layer: q/k/v, o, gate/up, down


def test_a_group_is_read_only_after_the_cache_made_room_for_it(tmp_path):
    import gc
    import weakref

    path = save_calibration(tmp_path / "c.safetensors", small_groups(), SMALL_MODULES, {})
    cal = load_calibration(path, groups_in_memory=1)
    attn = weakref.ref(cal.module("l.q_proj"))
    gc.collect()
    assert attn() is not None  # held by the file's cache
    reads = []
    read_group = cal._read_group

    def spy(entry):
        gc.collect()
        reads.append((entry.name, attn() is None, len(cal._cache)))
        return read_group(entry)

    cal._read_group = spy
    assert cal.module("l.down_proj").group == "mlp"
    assert reads == [("mlp", True, 0)]  # attn's statistics were let go before mlp's were read
    assert cal.module("l.down_proj") is cal.module("l.down_proj") and len(reads) == 1


def test_existing_file_needs_force(tmp_path):
    path = save_calibration(tmp_path / "c.safetensors", small_groups(0), SMALL_MODULES, {})
    before = path.read_bytes()
    with pytest.raises(InputError, match="exists") as info:
        save_calibration(path, small_groups(1), SMALL_MODULES, {})
    assert str(path) in one_line(info) and path.read_bytes() == before
    save_calibration(path, small_groups(1), SMALL_MODULES, {}, force=True)
    assert path.read_bytes() != before and leftovers(tmp_path) == []


def test_writer_refuses_inconsistent_statistics_and_writes_nothing(tmp_path):
    groups = small_groups()
    with pytest.raises(ValueError, match="without statistics"):
        save_calibration(tmp_path / "c.safetensors", groups, {**SMALL_MODULES, "x": "nope"}, {})
    bad = ModuleCalibration("attn", groups["attn"].harmful, groups["mlp"].task)
    with pytest.raises(ValueError, match="n = "):
        save_calibration(tmp_path / "c.safetensors", {**groups, "attn": bad}, SMALL_MODULES, {})
    nan = groups["attn"].harmful.matrix.clone()
    nan[0, 0] = float("nan")
    poisoned = ModuleCalibration("attn", type(groups["attn"].harmful)(n=10, matrix=nan, tokens=3), groups["attn"].task)
    with pytest.raises(ValueError, match="NaN"):
        save_calibration(tmp_path / "c.safetensors", {**groups, "attn": poisoned}, SMALL_MODULES, {})
    assert list(tmp_path.iterdir()) == []


# -- checks against the adapter and the model ---------------------------------------------------------
def test_check_modules_names_the_missing_module_and_the_wrong_size(tmp_path, tiny_calibration):
    cal = load_calibration(tiny_calibration)
    shapes = {name: (16, n) for name, n in tiny_module_inputs().items()}
    cal.check_modules(shapes, "adapter/adapter_model.safetensors")
    with pytest.raises(InputError) as info:
        cal.check_modules({**shapes, "model.layers.2.mlp.up_proj": (48, 32)}, "adapter/x.safetensors")
    assert str(tiny_calibration) in one_line(info) and "model.layers.2.mlp.up_proj" in str(info.value)
    with pytest.raises(InputError, match="inputs of size 48") as info:
        cal.check_modules({DOWN: (32, 64)}, "adapter/x.safetensors")
    assert str(tiny_calibration) in one_line(info) and DOWN in str(info.value)


def test_check_model_compares_the_fingerprint(tmp_path, tiny_pair, tiny_calibration):
    cal = load_calibration(tiny_calibration)
    digest = model_fingerprint(tiny_pair[1])["digest"]
    assert cal.info[MODEL_FINGERPRINT_KEY]["digest"] == digest
    cal.check_model(digest, tiny_pair[1])
    with pytest.raises(InputError, match="another model") as info:
        cal.check_model(model_fingerprint(tiny_pair[0])["digest"], tiny_pair[0])
    assert str(tiny_calibration) in one_line(info) and str(tiny_pair[0]) in str(info.value)
    unsigned = build_calibration(tmp_path / "unsigned.safetensors", None)
    with pytest.raises(InputError, match="no model fingerprint") as info:
        load_calibration(unsigned).check_model(digest, tiny_pair[1])
    one_line(info)


# -- bad files -------------------------------------------------------------------------------------
def test_nan_in_the_statistics_is_found_on_read(tmp_path, tiny_calibration):
    group = calibration_group(Q)

    def poison(tensors):
        tensors[f"{group}.task.matrix"][3, 4] = float("nan")

    bad = edited_copy(tiny_calibration, tmp_path / "nan.safetensors", poison)
    cal = load_calibration(bad)  # headers are fine
    cal.module(DOWN)  # other groups still read
    with pytest.raises(InputError, match="NaN") as info:
        cal.module(Q)
    assert str(bad) in one_line(info) and f"{group}.task.matrix" in str(info.value)


def test_inf_in_spiked_eigenvalues_is_found_on_read(tmp_path):
    path = save_calibration(tmp_path / "c.safetensors", small_groups(), SMALL_MODULES, {})

    def poison(tensors):
        tensors["mlp.harmful.L"][0] = float("inf")

    bad = edited_copy(path, tmp_path / "inf.safetensors", poison)
    with pytest.raises(InputError, match="Inf") as info:
        load_calibration(bad).module("l.down_proj")
    assert "mlp.harmful.L" in one_line(info)


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty"])
def test_truncated_or_garbled_file_is_one_line(tmp_path, tiny_calibration, damage):
    data = tiny_calibration.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbled": b"\x07" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(InputError) as info:
        load_calibration(bad)
    assert str(bad) in one_line(info)


def test_pickles_folders_missing_files_and_other_safetensors_are_refused(tmp_path, tiny_calibration):
    pickled = tmp_path / "calibration.pt"
    pickled.write_bytes(b"\x80\x04not really a pickle")
    cases = {
        pickled: "pickled",
        tmp_path: "folder",
        tmp_path / "missing.safetensors": "no such",
    }
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    cases[other] = "not a csulora calibration file"
    for path, match in cases.items():
        with pytest.raises(InputError, match=match) as info:
            load_calibration(path)
        assert str(path) in one_line(info)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(version=99), "version 99"),
    (lambda m: m.update(format="csulora-subspace"), "not a csulora calibration file"),
    (lambda m: m["modules"].update({"x.q_proj": "ghost"}), "ghost"),
    (lambda m: m["groups"]["model.layers.1.mlp.down_proj"].update(n=40), "shape"),
    (lambda m: m["groups"]["model.layers.1.mlp.down_proj"]["task"].update(tokens=0), "corrupt metadata"),
    (lambda m: m["groups"]["model.layers.1.mlp.down_proj"]["task"].update(form="sparse"), "corrupt metadata"),
    (lambda m: m.pop("groups"), "groups"),
])
def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path, tiny_calibration, edit, match):
    bad = edited_copy(tiny_calibration, tmp_path / "bad.safetensors", edit_meta=edit)
    with pytest.raises(InputError, match=match) as info:
        load_calibration(bad)
    assert str(bad) in one_line(info)


def test_a_missing_tensor_is_named(tmp_path, tiny_calibration):
    name = f"{calibration_group(Q)}.harmful.matrix"
    bad = edited_copy(tiny_calibration, tmp_path / "bad.safetensors", lambda t: t.pop(name))
    with pytest.raises(InputError, match="missing") as info:
        load_calibration(bad)
    assert name in one_line(info)


# -- statistics that are not positive semi-definite (issue 23) ----------------------------------
@pytest.mark.parametrize("damage, reason", [
    (lambda t, name: t.update({name: -t[name]}), "negative diagonal entry"),
    (lambda t, name: t[name].__setitem__((0, 5), t[name][0, 5] + 10.0), "not symmetric"),
    (lambda t, name: t.update({name: t[name] + 50.0 * (1 - torch.eye(t[name].shape[0]))}), "Cauchy-Schwarz"),
])
def test_a_gram_that_is_not_psd_is_refused_on_read_naming_file_tensor_and_module(tmp_path, tiny_calibration, damage,
                                                                                   reason):
    name = f"{calibration_group(Q)}.harmful.matrix"
    bad = edited_copy(tiny_calibration, tmp_path / "bad.safetensors", lambda t: damage(t, name))
    cal = load_calibration(bad)
    cal.module(DOWN)  # the other groups still read
    with pytest.raises(InputError, match="not positive semi-definite") as info:
        cal.module(V)
    message = one_line(info)
    assert str(bad) in message and name in message and V in message and reason in message


def test_spiked_statistics_with_a_damaged_eigenvector_are_refused(tmp_path):
    path = save_calibration(tmp_path / "c.safetensors", small_groups(), SMALL_MODULES, {})
    bad = edited_copy(path, tmp_path / "bad.safetensors", lambda t: t["mlp.task.U"].mul_(3.0))
    with pytest.raises(InputError, match=r"mlp\.task\.U/L .*l\.down_proj.*has norm 3") as info:
        load_calibration(bad).module("l.down_proj")
    one_line(info)


# -- a corrupt header is named in one short line (issue 23) ---------------------------------------
HUGE = "x" * 5000


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format=HUGE), "not a csulora calibration file"),
    (lambda m: m.update(version={"k": HUGE}), "version .* is not supported"),
    (lambda m: m["modules"].update({"x.q_proj": HUGE}), "maps to group"),
    (lambda m: m["modules"].update({"x.q_proj": ["unhashable"]}), "maps to group"),
    (lambda m: m["groups"]["model.layers.1.mlp.down_proj"]["task"].update(tokens=HUGE), "corrupt metadata for group"),
    (lambda m: m["groups"].update({HUGE: m["groups"]["model.layers.1.mlp.down_proj"]}), "missing"),
])
def test_a_corrupt_header_is_one_short_line(tmp_path, tiny_calibration, edit, match):
    bad = edited_copy(tiny_calibration, tmp_path / "bad.safetensors", edit_meta=edit)
    with pytest.raises(InputError, match=match) as info:
        load_calibration(bad)
    message = one_line(info)
    assert str(bad) in message and len(message) < len(str(bad)) + 300, len(message)


def test_any_damaged_header_byte_is_refused_or_read_never_a_traceback_or_an_echo(tmp_path, tiny_calibration):
    """Every 37th byte of the header flipped in turn: each file loads, or is refused in one short line."""
    import struct

    data = tiny_calibration.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    bad = tmp_path / "bad.safetensors"
    for position in range(8, 8 + size, 37):
        damaged = bytearray(data)
        damaged[position] ^= 0x41
        bad.write_bytes(bytes(damaged))
        try:
            load_calibration(bad)
        except InputError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < len(str(bad)) + 300, (position, str(exc))


# -- roles: the aligned model's statistics and the fine-tuned model's (Antidote's) ---------------
def update_groups(seed: int = 0) -> dict[str, ModuleCalibration]:
    """The harmful moments of :func:`small_groups`, no task: an update-statistics file's groups."""
    return {name: ModuleCalibration(name, c.harmful, None) for name, c in small_groups(seed).items()}


def test_an_update_file_holds_the_harmful_set_only(tmp_path):
    groups = update_groups()
    path = save_calibration(tmp_path / "u.safetensors", groups, SMALL_MODULES, {"a": 1}, role=ROLE_UPDATE)
    cal = load_calibration(path)
    assert cal.role == ROLE_UPDATE and cal.meta["role"] == ROLE_UPDATE
    attn, mlp = cal.module("l.q_proj"), cal.module("l.down_proj")
    assert attn.task is None and mlp.task is None and not mlp.harmful.is_dense
    assert torch.equal(attn.harmful.matrix, groups["attn"].harmful.matrix.float().double())
    assert set(cal.meta["groups"]["attn"]) == {"n", "harmful"}
    with safe_open(str(path), "pt") as f:
        assert not any(".task." in key for key in f.keys())
    cal.check_role(ROLE_UPDATE)
    aligned = load_calibration(save_calibration(tmp_path / "a.safetensors", small_groups(), SMALL_MODULES, {}))
    assert aligned.role == ROLE_ALIGNED and aligned.module("l.q_proj").task is not None
    aligned.check_role(ROLE_ALIGNED)


def test_a_file_without_a_role_is_the_aligned_models(tmp_path, tiny_calibration):
    older = edited_copy(tiny_calibration, tmp_path / "older.safetensors", edit_meta=lambda m: m.pop("role"))
    assert load_calibration(older).role == ROLE_ALIGNED
    bad = edited_copy(tiny_calibration, tmp_path / "bad.safetensors", edit_meta=lambda m: m.update(role="base"))
    with pytest.raises(InputError, match=r"unknown calibration file role 'base'") as info:
        load_calibration(bad)
    assert str(bad) in one_line(info)


def test_the_writer_refuses_sets_that_do_not_fit_the_role(tmp_path):
    with pytest.raises(ValueError, match="group attn: statistics of role 'update' hold no task set"):
        save_calibration(tmp_path / "u.safetensors", small_groups(), SMALL_MODULES, {}, role=ROLE_UPDATE)
    with pytest.raises(ValueError, match="group attn: statistics of role 'aligned' need a task set"):
        save_calibration(tmp_path / "a.safetensors", update_groups(), SMALL_MODULES, {})
    with pytest.raises(ValueError, match="role 'base'"):
        save_calibration(tmp_path / "b.safetensors", small_groups(), SMALL_MODULES, {}, role="base")
    assert list(tmp_path.iterdir()) == []


def test_a_file_under_the_other_roles_flag_is_one_line_naming_both_commands(tmp_path):
    update = load_calibration(save_calibration(tmp_path / "u.safetensors", update_groups(), SMALL_MODULES, {},
                                               role=ROLE_UPDATE))  # fmt: skip
    with pytest.raises(InputError) as info:
        update.check_role(ROLE_ALIGNED)
    assert one_line(info) == (
        f"--calibration {update.path}: it holds Antidote's statistics of the fine-tuned model (read by "
        "--update-statistics), not the aligned model's statistics; write those with `csulora calibrate ALIGNED --task FILE`"
    )
    aligned = load_calibration(save_calibration(tmp_path / "a.safetensors", small_groups(), SMALL_MODULES, {}))
    with pytest.raises(InputError) as info:
        aligned.check_role(ROLE_UPDATE)
    assert one_line(info) == (
        f"--update-statistics {aligned.path}: it holds the aligned model's statistics (read by --calibration), not "
        "Antidote's statistics of the fine-tuned model; write those with "
        "`csulora calibrate ALIGNED --update UPDATE --pairs FILE`"
    )


def test_check_update_compares_the_updates_fingerprint(tmp_path):
    recorded = {"kind": "adapter", "digest": "a" * 64}
    path = save_calibration(tmp_path / "u.safetensors", update_groups(), SMALL_MODULES,
                            {UPDATE_KEY: {"fingerprint": recorded}}, role=ROLE_UPDATE)  # fmt: skip
    cal = load_calibration(path)
    cal.check_update({"kind": "adapter", "digest": "a" * 64, "files": {}}, "ADAPTER")
    for other in ({"kind": "adapter", "digest": "b" * 64}, {"kind": "checkpoint", "digest": "a" * 64}):
        with pytest.raises(InputError, match=r"statistics were measured on another adapter than /x/other "
                                             r"\(weights or config differ\); rerun `csulora calibrate ALIGNED "
                                             r"--update /x/other --pairs FILE`") as info:  # fmt: skip
            cal.check_update(other, "/x/other")
        assert str(path) in one_line(info)
    silent = load_calibration(save_calibration(tmp_path / "s.safetensors", update_groups(), SMALL_MODULES, {},
                                               role=ROLE_UPDATE))  # fmt: skip
    with pytest.raises(InputError, match=r"records no update fingerprint \(info\.update\.fingerprint\)"):
        silent.check_update(recorded, "ADAPTER")
