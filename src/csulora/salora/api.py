"""``train_salora``: SaLoRA training from files to a plain PEFT LoRA adapter folder.

Order of work (cheap checks first, so a bad option never costs a model load):
1. options, output folder, data files, checkpoint header (target shapes vs ranks);
2. load the aligned model; safety feature pass (the model's own greedy refusals to the
   safety prompts, then ``V_s``) and task feature pass (``V_t``), each cached;
3. SaLoRA model on stock PEFT, trained with the project's ``Trainer`` loop;
4. export ``B' = C [B | -B0]``, ``A' = [A ; A0]`` (rank 2r, alpha 2r) plus ``salora.json``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from csulora.errors import InputError, OptionError
from csulora.io.atomic import atomic_output_dir
from csulora.io.checkpoints import CheckpointReader, decoder_linear_modules, weight_name
from csulora.salora.config import SaLoRAConfig
from csulora.salora.features import (
    CACHE_FORMAT,
    FeatureDirections,
    cache_key,
    cache_path,
    collect_output_grams,
    content_digest,
    count_response_tokens,
    directions_from_grams,
    load_directions,
    model_fingerprint,
    save_directions,
)
from csulora.salora.model import (
    build_salora_model,
    exported_lora_config,
    exported_state_dict,
    find_target_linears,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "salora.json"
CACHE_ENV = "CSULORA_CACHE"  # the project's cache root (the tiny world lives there too)


def default_cache_dir() -> Path:
    """Where feature passes are cached unless ``cache_dir`` is given.

    ``$CSULORA_CACHE/salora``, else the per-user cache ``$XDG_CACHE_HOME/csulora/salora``
    (``~/.cache/csulora/salora``): a rerun from any working directory finds it.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "salora"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "csulora" / "salora"


# --------------------------------------------------------------------------- checks


def target_shapes_from_header(model_dir: str | os.PathLike, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every target weight, read from the safetensors headers only."""
    with CheckpointReader(model_dir) as reader:
        modules = decoder_linear_modules(reader, targets)
        shapes = {module: reader.shape(weight_name(module)) for module in modules}
    if not shapes:
        raise InputError(f"{model_dir}: no 2-D weight of a module named {', '.join(targets)} (check the targets)")
    return {module: (int(shape[0]), int(shape[1])) for module, shape in shapes.items()}


def check_ranks(shapes: Mapping[str, tuple[int, int]], config: SaLoRAConfig, where: str) -> None:
    """Every rank must fit every target layer (r_s < m so that C is not zero)."""
    for module, (m, n) in shapes.items():
        if config.rank > min(m, n):
            raise OptionError(f"{where}: rank {config.rank} exceeds layer {module} ({m} x {n})")
        if config.safety_rank >= m:
            raise OptionError(
                f"{where}: safety rank {config.safety_rank} must be below layer {module}'s output size {m} "
                "(C = I - V_s V_s^T would be zero)"
            )
        if config.task_rank > m:
            raise OptionError(f"{where}: task rank {config.task_rank} exceeds layer {module}'s output size {m}")


def check_token_count(tokens: int, rank: int, what: str, where: str) -> None:
    """The Gram of ``tokens`` feature rows has rank <= tokens: fewer cannot span ``rank`` directions."""
    if tokens < rank:
        raise InputError(
            f"{where}: the {what} samples give {tokens} response tokens, fewer than the rank {rank} "
            "(give more or longer samples, or a lower rank)"
        )


def seeded_sample(count: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(count)`` chosen by ``seed``, in file order."""
    return sorted(random.Random(seed).sample(range(count), k))


def require_samples(available: int, config: SaLoRAConfig, what: str, path: str | os.PathLike) -> None:
    if available < config.num_samples:
        raise InputError(
            f"{path}: {available} {what} samples, SaLoRA's feature pass needs num_samples={config.num_samples} "
            "(add samples or lower num_samples)"
        )


# --------------------------------------------------------------------------- feature passes


def _feature_description(role: str, model_dir, texts_digest: str, rank: int, config: SaLoRAConfig) -> dict:
    return {
        "format": CACHE_FORMAT,
        "role": role,
        "model": model_fingerprint(model_dir),
        "data": texts_digest,
        "rank": rank,
        "num_samples": config.num_samples,
        "targets": list(config.targets),
        "seed": config.seed,
        "max_length": config.max_length,
        "max_new_tokens": config.max_new_tokens if role == "safety" else None,
    }


def _feature_pass(
    model, tokenizer, pairs: list[dict], rank: int, config: SaLoRAConfig, *, role: str, where: str, progress: bool,
    started: float, info: dict | None = None,
) -> FeatureDirections:
    from csulora.training.data import tokenize_pairs

    examples = tokenize_pairs(tokenizer, pairs, config.max_length)
    tokens = count_response_tokens(examples)
    check_token_count(tokens, rank, role, where)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    grams = collect_output_grams(
        model, examples, config.targets, pad_id=pad_id, progress=progress, desc=f"salora {role} features"
    )
    bases, values, captured = directions_from_grams(grams, rank, seed=config.seed)
    return FeatureDirections(
        bases=bases, singular_values=values, tokens=tokens, samples=len(pairs),
        seconds=time.perf_counter() - started, captured=captured, info=info or {},
    )


def safety_directions(
    model, tokenizer, model_dir, prompts: list[str], config: SaLoRAConfig, *, where: str,
    cache_dir: Path | None, progress: bool,
) -> FeatureDirections:
    """``V_s`` per layer from the aligned model's own greedy refusals to ``prompts`` (cached)."""
    from csulora.eval.generation import generate_responses

    description = _feature_description("safety", model_dir, content_digest(prompts), config.safety_rank, config)
    names = list(find_target_linears(model, config.targets))
    path = cache_path(cache_dir, "safety", cache_key(description)) if cache_dir is not None else None
    if path is not None and (hit := load_directions(path, description, names)) is not None:
        return hit
    started = time.perf_counter()
    refusals = generate_responses(
        model, tokenizer, prompts, max_new_tokens=config.max_new_tokens, progress=progress,
        desc="salora safety refusals",
    )
    generation_seconds = time.perf_counter() - started
    pairs = [{"prompt": p, "response": r} for p, r in zip(prompts, refusals)]
    result = _feature_pass(
        model, tokenizer, pairs, config.safety_rank, config, role="safety", where=where, progress=progress,
        started=started, info={"refusals": refusals, "generation_seconds": generation_seconds},
    )
    if path is not None:
        save_directions(path, result, description)
    return result


def task_directions(
    model, tokenizer, model_dir, pairs: list[dict], config: SaLoRAConfig, *, where: str,
    cache_dir: Path | None, progress: bool,
) -> FeatureDirections:
    """``V_t`` per layer from task prompt/response pairs (cached)."""
    digest = content_digest(t for p in pairs for t in (p["prompt"], p["response"]))
    description = _feature_description("task", model_dir, digest, config.task_rank, config)
    names = list(find_target_linears(model, config.targets))
    path = cache_path(cache_dir, "task", cache_key(description)) if cache_dir is not None else None
    if path is not None and (hit := load_directions(path, description, names)) is not None:
        return hit
    result = _feature_pass(
        model, tokenizer, pairs, config.task_rank, config, role="task", where=where, progress=progress,
        started=time.perf_counter(),
    )
    if path is not None:
        save_directions(path, result, description)
    return result


# --------------------------------------------------------------------------- entry point


def train_salora(
    model_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    safety_data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: SaLoRAConfig,
    force: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Train a SaLoRA adapter on ``data_path`` and write it as a plain PEFT LoRA to ``out_dir``.

    ``model_dir``: the aligned checkpoint (safetensors). ``data_path``: task JSONL of
    ``{"prompt", "response"}``. ``safety_data_path``: harmful prompts (JSONL ``prompt`` field,
    TXT one a line, or prompt/response pairs whose responses are ignored: the refusals are
    the aligned model's own greedy answers). ``cache_dir``: where feature passes are cached
    (default :func:`default_cache_dir`). ``device``: where the model runs (default: CUDA when
    present, else CPU); always in float32, the precision the cached feature passes assume.
    Returns ``out_dir``, holding ``adapter_config.json``, ``adapter_model.safetensors`` (rank
    2r relative to the original weights, loadable by stock ``PeftModel``) and ``salora.json``.
    """
    from csulora.io.modeling import load_model

    if not isinstance(config, SaLoRAConfig):
        raise OptionError(f"config must be a SaLoRAConfig, got {type(config).__name__}")
    data = _read_inputs(model_dir, data_path, safety_data_path, out_dir, config, force)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model, tokenizer = load_model(data.model_dir, device=device)
    linears = find_target_linears(model, config.targets)
    if not linears:
        raise InputError(f"{data.model_dir}: the model has no linear layer named {', '.join(config.targets)}")
    check_ranks({n: (l.out_features, l.in_features) for n, l in linears.items()}, config, str(data.model_dir))

    safety_sample = [data.safety[i] for i in seeded_sample(len(data.safety), config.num_samples, config.seed)]
    task_sample = [data.task[i] for i in seeded_sample(len(data.task), config.num_samples, config.seed)]
    safety = safety_directions(model, tokenizer, data.model_dir, safety_sample, config, where=str(safety_data_path),
                               cache_dir=cache, progress=progress)  # fmt: skip
    task = task_directions(model, tokenizer, data.model_dir, task_sample, config, where=str(data_path),
                           cache_dir=cache, progress=progress)  # fmt: skip
    peft_model, inits, train_seconds = _fit_salora(model, tokenizer, data, safety, task, config, progress)

    tensors = exported_state_dict(peft_model, inits)
    report = _report(config, data.model_dir, data_path, safety_data_path, safety_sample, safety, task, len(data.task),
                     train_seconds)  # fmt: skip
    with atomic_output_dir(data.out, force) as tmp:
        write_adapter(tmp, tensors, exported_lora_config(config, str(data.model_dir)))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return data.out


@dataclass(frozen=True)
class _Inputs:
    """What train_salora reads, checked before the model is loaded."""

    model_dir: Path
    out: Path
    task: list[dict]  # the task's prompt/response pairs
    safety: list[str]  # the harmful prompts


def _read_inputs(model_dir: str | os.PathLike, data_path: str | os.PathLike, safety_data_path: str | os.PathLike,
                 out_dir: str | os.PathLike, config: SaLoRAConfig, force: bool) -> _Inputs:  # fmt: skip
    """The output rule, both data files and the target shapes from the header: one-line errors, nothing loaded."""
    from csulora.eval.prompts import load_prompt_file
    from csulora.training.data import load_pairs
    from csulora.training.trainer import check_training_output

    out = check_training_output(out_dir, force, {"MODEL": model_dir, "--data": data_path,
                                                 "--safety-data": safety_data_path})  # fmt: skip
    task_pairs = load_pairs(data_path)
    safety_prompts = [p.text for p in load_prompt_file(safety_data_path)]
    require_samples(len(safety_prompts), config, "safety", safety_data_path)
    require_samples(len(task_pairs), config, "task", data_path)
    check_ranks(target_shapes_from_header(Path(model_dir), config.targets), config, str(model_dir))
    return _Inputs(Path(model_dir), out, task_pairs, safety_prompts)


def _fit_salora(model, tokenizer, data: _Inputs, safety, task, config: SaLoRAConfig, progress: bool):
    """SaLoRA's layers on the model (seeded), trained on the task: (peft model, initial factors, seconds)."""
    from csulora.training.data import tokenize_pairs
    from csulora.training.trainer import TrainConfig, fit

    train_config = TrainConfig(
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        max_length=config.max_length, weight_decay=config.weight_decay, progress=progress,
    )  # fmt: skip
    torch.manual_seed(config.seed)
    try:
        peft_model, inits = build_salora_model(model, safety.bases, task.bases, config)
    except ValueError as exc:  # e.g. a target name that also matches a non-linear module
        raise InputError(f"{data.model_dir}: cannot build SaLoRA layers on {', '.join(config.targets)} ({exc})") from None
    peft_model.train()
    started = time.perf_counter()
    fit(peft_model, tokenizer, tokenize_pairs(tokenizer, data.task, config.max_length), train_config)
    return peft_model, inits, time.perf_counter() - started


def write_adapter(folder: Path, tensors: Mapping[str, torch.Tensor], lora_config) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors``, the layout stock PEFT loads."""
    from safetensors.torch import save_file

    from csulora.training.trainer import sort_target_modules

    lora_config.save_pretrained(str(folder))
    sort_target_modules(folder / "adapter_config.json")
    save_file(dict(tensors), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _pass_summary(directions: FeatureDirections) -> dict:
    captured = list(directions.captured.values())
    return {
        "samples": directions.samples,
        "response_tokens": directions.tokens,
        "seconds": round(directions.seconds, 3),
        "cached": bool(directions.info.get("cached", False)),
        "generation_seconds": (
            round(directions.info["generation_seconds"], 3) if "generation_seconds" in directions.info else None
        ),
        "captured_energy_mean": round(sum(captured) / len(captured), 6) if captured else None,
        "captured_energy_min": round(min(captured), 6) if captured else None,
    }


def _report(config, model_dir, data_path, safety_path, safety_prompts, safety, task, train_samples,
            train_seconds) -> dict:  # fmt: skip
    """``salora.json``: what was run, the feature passes' cost, ranks and data counts."""
    from csulora.eval.judges import asr_judge

    refusals = safety.info.get("refusals") or []
    # SaLoRA's safety directions are only as good as the refusals they come from: say how
    # many of the aligned model's answers the ASR judge counts as refusals (not successes).
    # The refusals answer ``safety_prompts`` in order: the feature cache is keyed by them.
    refusing = sum(not ok for ok in asr_judge().judge(safety_prompts, refusals)) if refusals else 0
    return {
        "method": "salora",
        "model": str(Path(model_dir).resolve()),
        "data": str(Path(data_path).resolve()),
        "safety_data": str(Path(safety_path).resolve()),
        "config": config.to_dict(),
        "ranks": {
            "lora": config.rank,
            "safety": config.safety_rank,
            "task": config.task_rank,
            "exported": 2 * config.rank,
        },
        "modules": len(safety.bases),
        "train_samples": train_samples,
        "feature_pass": {
            "safety": _pass_summary(safety),
            "task": _pass_summary(task),
            # Cost of this run's feature passes (0 for those read from the cache) and of the passes themselves.
            "seconds_this_run": round(
                sum(p.seconds for p in (safety, task) if not p.info.get("cached", False)), 3
            ),
            "seconds_total": round(safety.seconds + task.seconds, 3),
        },
        "train_seconds": round(train_seconds, 3),
        "safety_responses_refusing": round(refusing / len(refusals), 4) if refusals else None,
        "refusal_examples": refusals[:5],
    }
