import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from csulora.errors import InputError
from csulora.io.checkpoints import CheckpointReader, read_displacement
from csulora.io.subspace_cache import (
    METADATA_KEY,
    check_fingerprint,
    load_subspace_cache,
    round_trip,
    save_subspace_cache,
)
from csulora.linalg.subspace import SubspaceConfig, compute_subspace
from tests.fixtures_tiny import LAYERS, UNTOUCHED_MODULE, tiny_pair, tiny_subspace  # noqa: F401

V = "model.layers.0.self_attn.v_proj"


def test_cache_holds_every_decoder_linear_layer_with_metadata(tiny_pair, tiny_subspace):
    cache = load_subspace_cache(tiny_subspace)
    assert len(cache.modules()) == 7 * LAYERS
    assert cache.options == {**SubspaceConfig().__dict__}
    sources = cache.meta["sources"]
    assert sources["base"] == str(tiny_pair[0].resolve()) and sources["aligned"] == str(tiny_pair[1].resolve())
    with CheckpointReader(tiny_pair[0]) as base, CheckpointReader(tiny_pair[1]) as aligned:
        D = read_displacement(base, aligned, V)
    entry = cache.entry(V)
    assert entry.shape == tuple(D.shape)
    assert entry.d_norm == pytest.approx(float(D.double().norm()), rel=1e-6)
    assert entry.energy >= 0.9
    sub = cache.get(V)
    Dk = sub.U @ torch.diag(sub.S) @ sub.V.T
    assert float((Dk - D.double()).norm() ** 2) == pytest.approx((1 - entry.energy) * entry.d_norm**2, rel=1e-3, abs=1e-9)


def test_untouched_module_has_an_empty_subspace(tiny_subspace):
    cache = load_subspace_cache(tiny_subspace)
    sub = cache.get(UNTOUCHED_MODULE)
    assert sub.rank == 0 and sub.U.shape == (16, 0) and sub.V.shape == (32, 0)
    assert sub.energy == 0.0 and sub.d_norm == 0.0


def test_cache_equals_the_on_the_fly_subspace(tiny_pair, tiny_subspace):
    cache = load_subspace_cache(tiny_subspace)
    with CheckpointReader(tiny_pair[0]) as base, CheckpointReader(tiny_pair[1]) as aligned:
        D = read_displacement(base, aligned, V)
    fresh = round_trip(compute_subspace(D, SubspaceConfig()))
    cached = cache.get(V)
    for a, b in ((fresh.U, cached.U), (fresh.S, cached.S), (fresh.V, cached.V)):
        assert torch.equal(a, b)
    check_fingerprint(cache, V, D)
    with pytest.raises(InputError, match="different base/aligned pair"):
        check_fingerprint(cache, V, D + 1e-3)


def test_rebuilding_is_byte_identical(tiny_pair, tmp_path):
    from csulora.references.subspace import build_subspace

    paths = [
        build_subspace(*tiny_pair, tmp_path / f"s{i}.safetensors", targets=["v_proj"], progress=False) for i in range(2)
    ]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert load_subspace_cache(paths[0]).modules() == [f"model.layers.{i}.self_attn.v_proj" for i in range(LAYERS)]


def test_plain_safetensors_file_is_not_a_cache(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(InputError, match="not a csulora subspace cache"):
        load_subspace_cache(path)


def _rewrite(src, dst, *, drop=None, meta_edit=None):
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        metadata = dict(f.metadata())
    meta = json.loads(metadata[METADATA_KEY])
    if meta_edit:
        meta_edit(meta)
    metadata[METADATA_KEY] = json.dumps(meta)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_cache_validation_errors(tiny_subspace, tmp_path):
    missing = _rewrite(tiny_subspace, tmp_path / "m.safetensors", drop=f"{V}.U")
    with pytest.raises(InputError, match=f"tensor {V}.U is missing"):
        load_subspace_cache(missing)
    version = _rewrite(tiny_subspace, tmp_path / "v.safetensors", meta_edit=lambda m: m.update(version=99))
    with pytest.raises(InputError, match="version 99 is not supported"):
        load_subspace_cache(version)

    def wrong_shape(meta):
        meta["modules"][V]["shape"] = [99, 32]

    shape = _rewrite(tiny_subspace, tmp_path / "s.safetensors", meta_edit=wrong_shape)
    with pytest.raises(InputError, match=f"tensor {V}.U has shape"):
        load_subspace_cache(shape)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(tiny_subspace.read_bytes()[:-5])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_subspace_cache(truncated)
    with pytest.raises(InputError, match="no such subspace cache"):
        load_subspace_cache(tmp_path / "none.safetensors")


def test_module_missing_from_cache_names_it(tiny_subspace):
    cache = load_subspace_cache(tiny_subspace)
    with pytest.raises(InputError, match="no subspace for module model.layers.9.mlp.up_proj"):
        cache.get("model.layers.9.mlp.up_proj")


def test_save_is_atomic_and_sorted(tmp_path):
    sub = compute_subspace(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), SubspaceConfig(rank=2))
    path = save_subspace_cache(
        tmp_path / "c.safetensors", {"model.layers.10.x": sub, "model.layers.2.x": sub},
        shapes={"model.layers.10.x": (6, 5), "model.layers.2.x": (6, 5)},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]
    assert load_subspace_cache(path).modules() == ["model.layers.2.x", "model.layers.10.x"]


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format="x" * 5000), "not a csulora subspace cache"),
    (lambda m: m.update(version=["x" * 5000]), "version .* is not supported"),
    (lambda m: m.update(modules=["x" * 5000]), "'modules' is not an object"),
    (lambda m: m["modules"].update({V: ["x" * 5000]}), "corrupt metadata for module"),
    (lambda m: m["modules"][V].update(rank="9" * 5000), "corrupt metadata for module"),
])
def test_a_corrupt_header_is_one_short_line(tiny_subspace, tmp_path, edit, match):
    bad = _rewrite(tiny_subspace, tmp_path / "bad.safetensors", meta_edit=edit)
    with pytest.raises(InputError, match=match) as info:
        load_subspace_cache(bad)
    message = str(info.value)
    assert "\n" not in message and len(message) < len(str(bad)) + 300, len(message)


def test_metadata_that_is_not_an_object_is_not_a_cache(tiny_subspace, tmp_path):
    with safe_open(str(tiny_subspace), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "list.safetensors"), metadata={METADATA_KEY: "[1, 2]"})
    with pytest.raises(InputError, match="not a csulora subspace cache"):
        load_subspace_cache(tmp_path / "list.safetensors")
