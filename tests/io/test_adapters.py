import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from csulora.errors import InputError
from csulora.io.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    alpha_for_scale,
    as_stored_update,
    files_not_copied,
    lora_scale,
    pattern_value,
    read_adapter,
    write_adapter,
)
from csulora.types import LoraUpdate
from tests.fixtures_tiny import (  # noqa: F401
    ADAPTER_VARIANTS,
    _tiny_model,
    adapter_variant,
    build_adapter,
    tiny_adapter,
)


def peft_scalings(adapter_dir: Path) -> dict[str, tuple[int, float]]:
    """(r, scaling) of every LoRA module as stock PEFT builds them from the folder."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(_tiny_model(0), adapter_dir)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (module.r["default"], module.scaling["default"])
    return out


def peft_merged_delta(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """W_merged - W for every linear weight, using stock PEFT's merge_and_unload."""
    from peft import PeftModel

    model = _tiny_model(0)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {
        n[: -len(".weight")]: p.detach().double() - before[n]
        for n, p in merged.named_parameters()
        if p.ndim == 2 and ".layers." in n
    }


@pytest.mark.parametrize("variant", sorted(ADAPTER_VARIANTS))
def test_scaling_and_ranks_match_peft(tmp_path_factory, variant):
    adapter_dir = adapter_variant(tmp_path_factory, variant)
    adapter = read_adapter(adapter_dir)
    expected = peft_scalings(adapter_dir)
    assert sorted(expected) == sorted(adapter.modules)
    for name, module in adapter.modules.items():
        r, scaling = expected[name]
        assert module.rank == r, name
        assert module.scale == pytest.approx(scaling, rel=1e-15), name


def test_pattern_value_follows_peft_regex_semantics():
    from peft.utils.other import get_pattern_key

    patterns = {"layers.1.self_attn.q_proj": 3, "q_proj": 5, "mlp.*_proj": 7}
    names = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.xq_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    for name in names:
        key = get_pattern_key(patterns.keys(), name)
        assert pattern_value(patterns, name, 8) == patterns.get(key, 8), name
    assert pattern_value(patterns, "model.layers.11.self_attn.q_proj", 8) == 5
    assert pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 8) == 8


def test_alpha_for_scale_inverts_lora_scale():
    for rank in (1, 2, 3, 7, 16, 23):
        for rslora in (False, True):
            s = lora_scale(8, 4, rslora)
            assert lora_scale(alpha_for_scale(s, rank, rslora), rank, rslora) == pytest.approx(s, rel=1e-14)
    assert alpha_for_scale(2.0, 3, False) == 6 and isinstance(alpha_for_scale(2.0, 3, False), int)
    assert alpha_for_scale(8 / math.sqrt(3), 3, True) == 8


def _random_updates(adapter, extra_rank: int, seed: int = 0) -> dict[str, LoraUpdate]:
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for name, module in adapter.modules.items():
        m, n = module.shape
        r = module.rank + extra_rank
        updates[name] = LoraUpdate(
            A=torch.randn(r, n, generator=g, dtype=torch.float64),
            B=torch.randn(m, r, generator=g, dtype=torch.float64),
            scale=module.scale,
        )
    return updates


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns", "rslora_patterns"])
@pytest.mark.parametrize("extra_rank", [0, 3, -1])
def test_written_adapter_merges_in_peft_to_the_dense_update(tmp_path_factory, tmp_path, variant, extra_rank):
    adapter = read_adapter(adapter_variant(tmp_path_factory, variant))
    updates = _random_updates(adapter, extra_rank)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(adapter, out, updates)
    deltas = peft_merged_delta(out)
    for name, update in updates.items():
        expected = update.dense()
        assert torch.allclose(deltas[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), name
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    for key in list(config["rank_pattern"]) + list(config["alpha_pattern"]):
        assert key in adapter.modules  # full module names only
    reread = read_adapter(out)
    for name, module in reread.modules.items():
        assert module.scale == pytest.approx(adapter.modules[name].scale, rel=1e-12)


def test_unchanged_modules_and_dtype_are_kept(tmp_path_factory, tmp_path):
    source = adapter_variant(tmp_path_factory, "bf16")
    adapter = read_adapter(source)
    first = next(iter(adapter.modules))
    updates = _random_updates(adapter, 2)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(adapter, out, {first: updates[first]})
    written = load_file(str(out / ADAPTER_WEIGHTS))
    original = load_file(str(source / ADAPTER_WEIGHTS))
    assert sorted(written) == sorted(original)
    for key, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        if first not in key:
            assert torch.equal(tensor, original[key])
    assert written[f"base_model.model.{first}.lora_A.weight"].shape[0] == adapter.modules[first].rank + 2


def test_writing_is_deterministic(tmp_path_factory, tmp_path):
    adapter = read_adapter(adapter_variant(tmp_path_factory, "patterns"))
    updates = _random_updates(adapter, 1)
    outputs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        out.mkdir()
        write_adapter(adapter, out, updates, model_card="# card\n")
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert outputs[0]["README.md"] == b"# card\n"  # the caller's card, not the input's PEFT card


def test_input_card_and_training_record_are_not_copied_but_tokenizer_files_are(tiny_adapter, tmp_path):
    """issue 13: the input's README and train_config.json described the attack, not the correction."""
    source = _copy(tiny_adapter, tmp_path / "in")
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\ntrained on harmful data\n")
    (source / "train_config.json").write_text('{"data": "attack.jsonl"}')
    (source / "tokenizer_config.json").write_text("{}")
    (source / "chat_template.jinja").write_text("{{ messages }}")
    adapter = read_adapter(source)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(adapter, out, {})
    assert sorted(p.name for p in out.iterdir()) == [
        ADAPTER_CONFIG, ADAPTER_WEIGHTS, "chat_template.jinja", "tokenizer_config.json",
    ]
    assert files_not_copied(source) == ["README.md", "train_config.json"]


def test_base_model_path_is_kept_unless_given(tiny_adapter, tmp_path):
    adapter = read_adapter(tiny_adapter)
    kept, replaced = tmp_path / "kept", tmp_path / "replaced"
    kept.mkdir(), replaced.mkdir()
    write_adapter(adapter, kept, {})
    write_adapter(adapter, replaced, {}, base_model_name_or_path="org/aligned")
    original = adapter.config.get("base_model_name_or_path")
    assert json.loads((kept / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") == original
    assert json.loads((replaced / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/aligned"


def test_stored_update_is_what_write_adapter_writes(tmp_path_factory, tmp_path):
    """issue 15: correct_adapter keeps each result in this form until the write; writing it
    again must not change a byte, and it must already be in the file's dtype and scale."""
    adapter = read_adapter(adapter_variant(tmp_path_factory, "bf16"))
    updates = _random_updates(adapter, 1)
    first, module = next(iter(adapter.modules.items()))
    doubled = updates[first]
    updates[first] = LoraUpdate(A=doubled.A, B=doubled.B, scale=2 * module.scale)  # folded into B
    stored = {name: as_stored_update(adapter.modules[name], update) for name, update in updates.items()}
    assert all(u.A.dtype == u.B.dtype == torch.bfloat16 for u in stored.values())
    assert stored[first].scale == module.scale
    kept = stored[first].scale * stored[first].B.double() @ stored[first].A.double()
    assert torch.linalg.norm(kept - updates[first].dense()) < 1e-2 * torch.linalg.norm(updates[first].dense())
    outputs = []
    for name, given in (("float64", updates), ("stored", stored)):
        out = tmp_path / name
        out.mkdir()
        write_adapter(adapter, out, given)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]


def test_empty_update_is_written_as_one_zero_direction(tmp_path, tiny_adapter):
    adapter = read_adapter(tiny_adapter)
    name, module = next(iter(adapter.modules.items()))
    m, n = module.shape
    empty = LoraUpdate(A=torch.zeros(0, n, dtype=torch.float64), B=torch.zeros(m, 0, dtype=torch.float64), scale=module.scale)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(adapter, out, {name: empty})
    assert torch.count_nonzero(peft_merged_delta(out)[name]) == 0


# -- refusals -----------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"target_parameters": ["experts.weight"]}, "target_parameters"),
        ({"r": 0}, "r must be a positive number"),
    ],
)
def test_unsupported_configs_are_refused(tiny_adapter, tmp_path, changes, match):
    folder = _copy(tiny_adapter, tmp_path / "a")
    _edit_config(folder, **changes)
    with pytest.raises(InputError, match=match) as err:
        read_adapter(folder)
    assert ADAPTER_CONFIG in str(err.value) and "\n" not in str(err.value)


def test_real_dora_adapter_is_refused(tmp_path):
    folder = build_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(InputError, match="DoRA") as err:
        read_adapter(folder)
    # The flag is named once, as the config spells it (issue 13: it used to say it twice).
    assert str(err.value).lower().count("use_dora") == 1, str(err.value)
    assert str(err.value).endswith("(use_dora=True)")


@pytest.mark.parametrize("flag", ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora", "modules_to_save"])
def test_unsupported_flag_is_named_once(tiny_adapter, tmp_path, flag):
    folder = _copy(tiny_adapter, tmp_path / "a")
    _edit_config(folder, **{flag: ["lm_head"] if flag == "modules_to_save" else True})
    with pytest.raises(InputError) as err:
        read_adapter(folder)
    assert str(err.value).count(flag) == 1, str(err.value)


def test_real_embedding_lora_is_refused(tmp_path):
    folder = build_adapter(tmp_path / "emb", target_modules=("embed_tokens", "q_proj"))
    with pytest.raises(InputError, match="embedding LoRA"):
        read_adapter(folder)


def test_missing_config_is_refused(tiny_adapter, tmp_path):
    folder = _copy(tiny_adapter, tmp_path / "a")
    (folder / ADAPTER_CONFIG).unlink()
    with pytest.raises(InputError, match="no adapter_config.json"):
        read_adapter(folder)


def test_bin_only_adapter_gets_a_hint(tiny_adapter, tmp_path):
    folder = _copy(tiny_adapter, tmp_path / "a")
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(InputError, match="pickled adapter weights.*safe_serialization=True"):
        read_adapter(folder)


def test_rank_that_disagrees_with_config_is_refused(tiny_adapter, tmp_path):
    folder = _copy(tiny_adapter, tmp_path / "a")
    _edit_config(folder, r=5)
    with pytest.raises(InputError, match="rank 4 but adapter_config.json gives r=5"):
        read_adapter(folder)


def test_missing_factor_and_nan_factor_are_refused(tiny_adapter, tmp_path):
    tensors = load_file(str(tiny_adapter / ADAPTER_WEIGHTS))
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    folder = _copy(tiny_adapter, tmp_path / "a")
    broken = {k: v for k, v in tensors.items() if k != key_b}
    save_file(broken, str(folder / ADAPTER_WEIGHTS))
    with pytest.raises(InputError, match=f"tensor {key_b} is missing"):
        read_adapter(folder)
    poisoned = dict(tensors)
    poisoned[key_b] = poisoned[key_b].clone()
    poisoned[key_b][0, 0] = float("nan")
    save_file(poisoned, str(folder / ADAPTER_WEIGHTS))
    with pytest.raises(InputError, match=f"adapter_model.safetensors: tensor {key_b} contains NaN"):
        read_adapter(folder)


def test_truncated_adapter_weights_are_refused(tiny_adapter, tmp_path):
    folder = _copy(tiny_adapter, tmp_path / "a")
    path = folder / ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_adapter(folder)
