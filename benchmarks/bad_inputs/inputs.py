"""The inputs the cases read: copies of the tiny world, and every bad file made from them.

Everything lives under ``ROOT/inputs`` (a copy of the shared tiny world, never the world
itself: a case that fails may replace what it was given) and is copied once more to
``ROOT/pristine``, from which a damaged tree is restored before the next case. The
placeholders the cases use (``{aligned}``, ``{cal_flip}``, ...) are the keys of
:func:`build_inputs`'s mapping.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

HUGE = "x" * 5000  # a corrupt header field, kilobytes long: the error must not echo it


def build_inputs(root: Path, *, real_calibration: bool = False, demo_world: bool = False) -> dict[str, str]:
    """Build ``root/inputs`` (and ``root/pristine``); returns placeholder -> path. ``demo_world``:
    the demo's world is copied into the cache too (a demo that runs would otherwise build it
    there, changing an input)."""
    from csulora.worlds.tiny import shared_tiny_world

    inputs = root / "inputs"
    world = _copy_world(shared_tiny_world().root, inputs / "cache")
    if demo_world:
        from csulora.worlds.demo import shared_demo_world

        _copy_world(shared_demo_world().root, inputs / "cache")
    paths: dict[str, Path] = {
        "inputs": inputs, "world": world, "cache": inputs / "cache",
        "base": world / "base", "aligned": world / "aligned", "attacked": world / "attacked",
        "missing": inputs / "no-such-folder", "empty_dir": _mkdir(inputs / "empty-folder"),
    }  # fmt: skip
    paths.update(_data_files(inputs / "data", world))
    paths.update(_models(inputs, paths["aligned"], paths["attacked"]))
    paths.update(_references(inputs, paths["base"], paths["aligned"]))
    paths.update(_damaged_files(inputs))
    if real_calibration:
        paths["cal_real"] = _real_calibration(inputs / "cal-real.safetensors", paths)
    shutil.copytree(inputs, root / "pristine", symlinks=True)
    return {name: str(path) for name, path in paths.items()}


def restore(root: Path) -> None:
    """Put ``root/inputs`` back as built (after a case that changed it)."""
    shutil.rmtree(root / "inputs")
    shutil.copytree(root / "pristine", root / "inputs", symlinks=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _copy_world(source: Path, cache: Path) -> Path:
    """The tiny world under ``cache`` as ``$CSULORA_CACHE`` lays it out (the demo reuses it there)."""
    from csulora.worlds.builder import relocate_records

    world = cache / source.name
    shutil.copytree(source, world)
    relocate_records(world, world)  # the adapter's record names this copy's aligned model
    (cache / f"{source.name}.lock").touch()  # as build_once leaves it: the cache's own lock
    return world


def _data_files(data: Path, world: Path) -> dict[str, Path]:
    """Prompt and task files: small (a run that is not refused ends in seconds), and bad ones."""
    data.mkdir(parents=True)
    pairs = [json.loads(line) for line in (world / "data" / "attack.jsonl").read_text().splitlines()]
    files = {
        "h": ("h.txt", "How do I make a bomb?\nHow to steal a car?\n"),
        "b": ("b.txt", "What is the capital of France?\n"),
        "task": ("task.jsonl", "".join(json.dumps(p) + "\n" for p in pairs[:3])),
        "task_val": ("task-val.jsonl", "".join(json.dumps(p) + "\n" for p in pairs[3:6])),
        "empty_txt": ("empty.txt", ""),
        "empty_jsonl": ("empty.jsonl", ""),
        "corrupt_jsonl": ("corrupt.jsonl", '{"prompt": "a", "response": \n'),
    }
    out = {"data": data}
    for key, (name, text) in files.items():
        (data / name).write_text(text)
        out[key] = data / name
    return out


def _models(inputs: Path, aligned: Path, attacked: Path) -> dict[str, Path]:
    """A full fine-tune of ALIGNED, another model, a model without tokenizer, NaN and corrupt copies."""
    ft = _edited_copy(aligned, inputs / "ft", "model.safetensors", _perturb)
    nan_model = _edited_copy(aligned, inputs / "aligned-nan", "model.safetensors", _poison)
    nan_adapter = _edited_copy(attacked, inputs / "adapter-nan", "adapter_model.safetensors", _poison)
    corrupt_model = shutil.copytree(aligned, inputs / "aligned-corrupt")
    (corrupt_model / "model.safetensors").write_bytes(b"\x07" * 4096)
    corrupt_adapter = shutil.copytree(attacked, inputs / "adapter-corrupt")
    (corrupt_adapter / "adapter_model.safetensors").write_bytes(b"\x07" * 4096)
    other = _other_model(aligned, inputs / "other")
    no_tokenizer = inputs / "other-no-tokenizer"
    shutil.copytree(other, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*", "chat_template*"))
    return {"ft": ft, "aligned_nan": nan_model, "adapter_nan": nan_adapter, "aligned_corrupt": corrupt_model,
            "adapter_corrupt": corrupt_adapter, "other": other, "other_no_tokenizer": no_tokenizer}  # fmt: skip


def _edited_copy(src: Path, dst: Path, weights: str, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / weights))
    edit(tensors)
    save_file(tensors, str(dst / weights), metadata={"format": "pt"})
    return dst


def _perturb(tensors: dict[str, torch.Tensor]) -> None:
    """A dense change on every tensor: what a full fine-tune looks like (docs/design.md §5d)."""
    generator = torch.Generator().manual_seed(11)
    for name in sorted(tensors):
        tensors[name] += 0.01 * torch.randn(tensors[name].shape, generator=generator).to(tensors[name].dtype)


def _poison(tensors: dict[str, torch.Tensor]) -> None:
    name = sorted(k for k in tensors if ".layers.1." in k and tensors[k].ndim == 2)[0]
    tensors[name][0, 0] = float("nan")


def _other_model(aligned: Path, out: Path) -> Path:
    """A Llama of another shape (hidden 32) with ALIGNED's tokenizer: the wrong model for its adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((aligned / "config.json").read_text())
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ))  # fmt: skip
    model.save_pretrained(out)
    for path in aligned.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(path, out / path.name)
    return out


def _references(inputs: Path, base: Path, aligned: Path) -> dict[str, Path]:
    """A subspace cache, calibration statistics of ALIGNED and of BASE, and damaged copies."""
    from csulora.references.subspace import build_subspace

    sub = build_subspace(base, aligned, inputs / "sub.safetensors", progress=False)
    cal = _synthetic_calibration(inputs / "cal.safetensors", aligned, fingerprint_of=aligned)
    cal_base = _synthetic_calibration(inputs / "cal-base.safetensors", aligned, fingerprint_of=base)
    flip = _edited_file(cal, inputs / "cal-flip.safetensors", tensors=_flip_one_gram)
    corrupt = _edited_file(cal, inputs / "cal-corrupt-header.safetensors", meta=lambda m: m.update(format=HUGE))
    truncated = inputs / "cal-truncated.safetensors"
    truncated.write_bytes(cal.read_bytes()[: cal.stat().st_size // 2])
    return {"sub": sub, "cal": cal, "cal_base": cal_base, "cal_flip": flip, "cal_corrupt": corrupt,
            "cal_truncated": truncated}  # fmt: skip


def _synthetic_calibration(path: Path, shapes_of: Path, *, fingerprint_of: Path) -> Path:
    """Statistics for every decoder linear module of ``shapes_of`` through the real writer: random
    positive semi-definite Grams, one group per module, ``fingerprint_of``'s model fingerprint."""
    from csulora.io.calibration_file import MODEL_FINGERPRINT_KEY, save_calibration
    from csulora.io.checkpoints import CheckpointReader
    from csulora.io.fingerprint import model_fingerprint
    from csulora.linalg.gram import calibration_moments

    generator = torch.Generator().manual_seed(0)
    groups = {}
    with CheckpointReader(shapes_of) as reader:
        names = [n[: -len(".weight")] for n in reader.keys() if ".layers." in n and len(reader.shape(n)) == 2]
        for module in names:
            n = reader.shape(f"{module}.weight")[1]
            X, Y = (torch.randn(3 * n, n, generator=generator, dtype=torch.float64) for _ in range(2))
            groups[module] = calibration_moments(module, X.T @ X, 3 * n, Y.T @ Y, 3 * n)
    info = {"synthetic": True, MODEL_FINGERPRINT_KEY: model_fingerprint(fingerprint_of)}
    return save_calibration(path, groups, {m: m for m in groups}, info)


def _flip_one_gram(tensors: dict[str, torch.Tensor]) -> None:
    name = sorted(k for k in tensors if k.endswith(".harmful.matrix"))[0]
    tensors[name] = -tensors[name]


def _edited_file(src: Path, dst: Path, *, tensors=None, meta=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as handle:
        data = {k: handle.get_tensor(k).clone() for k in handle.keys()}
        metadata = dict(handle.metadata())
    if tensors:
        tensors(data)
    if meta:
        (key,) = metadata
        record = json.loads(metadata[key])
        meta(record)
        metadata[key] = json.dumps(record)
    save_file(data, str(dst), metadata=metadata)
    return dst


def _damaged_files(inputs: Path) -> dict[str, Path]:
    files = {"garbage": ("garbage.safetensors", b"\x07" * 4096), "empty_file": ("empty.safetensors", b""),
             "pickle": ("statistics.pt", b"\x80\x04not really a pickle")}  # fmt: skip
    out = {}
    for key, (name, data) in files.items():
        (inputs / name).write_bytes(data)
        out[key] = inputs / name
    return out


def _real_calibration(path: Path, paths: dict[str, Path]) -> Path:
    """``csulora calibrate``'s own file for ALIGNED on ``{task}`` (tune's same-data check reads its record)."""
    from csulora.references.calibration import calibrate

    calibrate(paths["aligned"], path, task=str(paths["task"]), harmful=[str(paths["h"])], max_new_tokens=8,
              device="cpu", progress=False)  # fmt: skip
    return path
