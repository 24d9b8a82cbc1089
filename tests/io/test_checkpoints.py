import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from csulora.errors import InputError
from csulora.io.checkpoints import (
    CheckpointReader,
    check_same_architecture,
    decoder_linear_modules,
    layer_index,
    natural_key,
    read_displacement,
)
from tests.fixtures_tiny import LAYERS, UNTOUCHED_MODULE, tiny_pair  # noqa: F401

Q = "model.layers.0.self_attn.q_proj"


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def simple_tensors(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g).to(dtype),
        f"{Q}.weight": torch.randn(8, 8, generator=g).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(dtype),
        "model.layers.0.input_layernorm.weight": torch.ones(8, dtype=dtype),
        "lm_head.weight": torch.randn(10, 8, generator=g).to(dtype),
    }


def test_reader_reads_one_tensor_as_float32_with_header_metadata(tiny_pair):
    base, _ = tiny_pair
    with CheckpointReader(base) as reader:
        assert f"{Q}.weight" in reader
        assert reader.shape(f"{Q}.weight") == (32, 32)
        assert reader.dtype_name(f"{Q}.weight") == "F32"
        tensor = reader.get(f"{Q}.weight")
        assert tensor.dtype == torch.float32 and tensor.shape == (32, 32)
        assert reader.config["model_type"] == "llama"


def test_sharded_checkpoint_reads_the_same_tensors(tiny_pair, tmp_path):
    from transformers import LlamaForCausalLM

    base, _ = tiny_pair
    model = LlamaForCausalLM.from_pretrained(base)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with CheckpointReader(base) as single, CheckpointReader(tmp_path / "sharded") as sharded:
        assert len(set(sharded.files.values())) > 1
        assert single.keys() == sharded.keys()
        for name in single.keys():
            assert torch.equal(single.get(name), sharded.get(name)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_displacement_is_computed_in_float32(tmp_path, dtype):
    base = write_checkpoint(tmp_path / "b", simple_tensors(0, dtype))
    aligned_tensors = simple_tensors(1, dtype)
    aligned = write_checkpoint(tmp_path / "a", aligned_tensors)
    with CheckpointReader(base) as b, CheckpointReader(aligned) as a:
        D = read_displacement(b, a, Q)
    expected = aligned_tensors[f"{Q}.weight"].float() - simple_tensors(0, dtype)[f"{Q}.weight"].float()
    assert D.dtype == torch.float32
    assert torch.equal(D, expected)


def test_float32_displacement_does_not_write_into_the_memory_map(tiny_pair):
    base, aligned = tiny_pair
    with CheckpointReader(base) as b, CheckpointReader(aligned) as a:
        before = a.get(f"{Q}.weight").clone()
        D = read_displacement(b, a, Q)
        D += 1.0
        assert torch.equal(a.get(f"{Q}.weight"), before)



@pytest.mark.parametrize("which", ["b", "a"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_displacement_refuses_nan_or_inf_naming_the_input_at_fault(tmp_path, which, bad):
    """read_displacement checks D once instead of each input: the error must still name the file."""
    tensors = {"b": simple_tensors(0, torch.bfloat16), "a": simple_tensors(1, torch.bfloat16)}
    tensors[which][f"{Q}.weight"][5, 2] = bad
    folders = {w: write_checkpoint(tmp_path / w, t) for w, t in tensors.items()}
    with CheckpointReader(folders["b"]) as b, CheckpointReader(folders["a"]) as a:
        with pytest.raises(InputError) as err:
            read_displacement(b, a, Q)
    message = str(err.value)
    assert str(folders[which] / "model.safetensors") in message and f"{Q}.weight" in message
    assert ("NaN" if bad != bad else "Inf") in message


def test_displacement_of_finite_inputs_that_overflows_is_refused(tmp_path):
    base, aligned = simple_tensors(0), simple_tensors(1)
    base[f"{Q}.weight"][0, 0], aligned[f"{Q}.weight"][0, 0] = -3e38, 3e38
    b_dir, a_dir = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "a", aligned)
    with CheckpointReader(b_dir) as b, CheckpointReader(a_dir) as a:
        with pytest.raises(InputError, match="overflows float32"):
            read_displacement(b, a, Q)


def test_displacement_with_a_huge_finite_sum_is_accepted(tmp_path):
    """Entries whose sum overflows float32 are finite: the fast check must not refuse them."""
    base, aligned = simple_tensors(0), simple_tensors(1)
    aligned[f"{Q}.weight"][:4] = 2e38
    b_dir, a_dir = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "a", aligned)
    with CheckpointReader(b_dir) as b, CheckpointReader(a_dir) as a:
        D = read_displacement(b, a, Q)
    assert torch.isfinite(D).all()
    assert torch.equal(D, aligned[f"{Q}.weight"] - base[f"{Q}.weight"])


def test_displacement_is_formed_by_blocks_equal_to_the_plain_difference(tmp_path, monkeypatch):
    """Several row blocks (and a ragged last one) give exactly the float32 difference."""
    import csulora.io.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "_DISPLACEMENT_BLOCK_ELEMENTS", 3 * 8)  # 3 rows of 8 per block
    base, aligned = simple_tensors(0, torch.bfloat16), simple_tensors(1, torch.bfloat16)
    b_dir, a_dir = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "a", aligned)
    with CheckpointReader(b_dir) as b, CheckpointReader(a_dir) as a:
        for module in (Q, "model.layers.0.mlp.up_proj", "model.layers.0.input_layernorm"):
            D = read_displacement(b, a, module)
            name = f"{module}.weight"
            assert torch.equal(D, aligned[name].float() - base[name].float()), module

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused_naming_file_and_tensor(tmp_path, bad):
    tensors = simple_tensors()
    tensors[f"{Q}.weight"][3, 4] = bad
    folder = write_checkpoint(tmp_path / "m", tensors)
    with CheckpointReader(folder) as reader:
        reader.get("lm_head.weight")  # clean tensors still read
        with pytest.raises(InputError) as err:
            reader.get(f"{Q}.weight")
    message = str(err.value)
    assert f"{Q}.weight" in message and "model.safetensors" in message
    assert ("NaN" if bad != bad else "Inf") in message
    assert "\n" not in message


def test_truncated_file_is_refused(tmp_path):
    folder = write_checkpoint(tmp_path / "m", simple_tensors())
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    with pytest.raises(InputError, match="model.safetensors") as err:
        CheckpointReader(folder)
    assert "\n" not in str(err.value)


def test_corrupt_header_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\xff" * 200)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        CheckpointReader(folder)


def test_truncated_shard_of_a_sharded_checkpoint_is_refused_on_use(tmp_path, tiny_pair):
    base, _ = tiny_pair
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(base).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    reader = CheckpointReader(tmp_path / "s")
    shard = reader.files[f"{Q}.weight"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"truncated or corrupt") as err:
        reader.get(f"{Q}.weight")
    assert shard.name in str(err.value)


def test_index_listing_a_tensor_missing_from_its_shard(tmp_path):
    folder = write_checkpoint(tmp_path / "m", simple_tensors())
    (folder / "model.safetensors").rename(folder / "shard-1.safetensors")
    weight_map = {name: "shard-1.safetensors" for name in simple_tensors()}
    weight_map["model.layers.0.self_attn.k_proj.weight"] = "shard-1.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with CheckpointReader(folder) as reader:
        with pytest.raises(InputError, match="listed in the index but missing"):
            reader.get("model.layers.0.self_attn.k_proj.weight")


def test_pickled_only_folder_gets_a_conversion_hint(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(InputError, match="safe_serialization=True"):
        CheckpointReader(folder)


def test_shape_mismatch_between_base_and_aligned_shows_both_shapes(tmp_path):
    tensors = simple_tensors()
    base = write_checkpoint(tmp_path / "b", tensors)
    tensors[f"{Q}.weight"] = torch.zeros(8, 6)
    aligned = write_checkpoint(tmp_path / "a", tensors)
    with CheckpointReader(base) as b, CheckpointReader(aligned) as a:
        with pytest.raises(InputError) as err:
            check_same_architecture(b, a, [Q])
    assert "[8, 6]" in str(err.value) and "[8, 8]" in str(err.value)


def test_different_architectures_are_refused_from_config(tmp_path):
    base = write_checkpoint(tmp_path / "b", simple_tensors(), {"model_type": "llama", "hidden_size": 8})
    aligned = write_checkpoint(tmp_path / "a", simple_tensors(1), {"model_type": "mistral", "hidden_size": 8})
    with CheckpointReader(base) as b, CheckpointReader(aligned) as a:
        with pytest.raises(InputError, match="different architecture.*model_type.*mistral"):
            check_same_architecture(b, a, [Q])


def test_module_missing_from_one_model(tmp_path):
    base = write_checkpoint(tmp_path / "b", simple_tensors())
    tensors = simple_tensors(1)
    del tensors[f"{Q}.weight"]
    aligned = write_checkpoint(tmp_path / "a", tensors)
    with CheckpointReader(base) as b, CheckpointReader(aligned) as a:
        with pytest.raises(InputError, match=f"no tensor {Q}.weight.*aligned"):
            check_same_architecture(b, a, [Q])


def test_decoder_linear_modules_skip_embeddings_norms_and_head(tiny_pair):
    base, _ = tiny_pair
    with CheckpointReader(base) as reader:
        modules = decoder_linear_modules(reader)
        assert len(modules) == 7 * LAYERS
        assert UNTOUCHED_MODULE in modules
        assert not any("norm" in m or "embed" in m or "lm_head" in m for m in modules)
        assert decoder_linear_modules(reader, ["q_proj", "model.layers.1.mlp.up_proj"]) == [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
        ]


def test_natural_sort_and_layer_index():
    names = ["model.layers.10.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert sorted(names, key=natural_key)[0] == "model.layers.2.mlp.up_proj"
    assert layer_index("model.layers.10.mlp.up_proj") == 10
    assert layer_index("lm_head") is None


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint folder"):
        CheckpointReader(tmp_path / "nope")
