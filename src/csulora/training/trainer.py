"""Fine-tuning with transformers' ``Trainer``: a full fine-tune or a PEFT LoRA adapter.

We only supply what ``Trainer`` leaves to the caller: the tokenized examples (loss on
response tokens, see :mod:`csulora.training.data`), a right-padding collator, and the
arguments derived from :class:`TrainConfig`. Outputs are written atomically: a
``save_pretrained`` safetensors checkpoint plus tokenizer (``train_full``) or a PEFT
adapter folder (``train_lora``), each with ``train_config.json`` recording how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from csulora.errors import OptionError
from csulora.io.atomic import atomic_output_dir, check_apart, check_output_dir
from csulora.training.data import IGNORE_INDEX, load_pairs, tokenize_pairs

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by full and LoRA fine-tuning (AdamW)."""

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    seed: int = field(default=0, metadata={"help": "seed for init, shuffling and dropout"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (prompt + response)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: no clipping)"})
    scheduler: str = field(default="linear", metadata={"help": f"learning-rate schedule: {', '.join(SCHEDULERS)}"})
    freeze_embeddings: bool = field(default=False, metadata={"help": "full fine-tune: keep the embeddings fixed"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise OptionError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise OptionError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise OptionError(f"learning rate must be > 0, got {self.lr}")
        if self.max_length < 8:
            raise OptionError(f"max length must be >= 8, got {self.max_length}")
        if self.weight_decay < 0 or self.warmup < 0 or self.grad_clip < 0:
            raise OptionError("weight decay, warmup and grad clip must be >= 0")
        if self.scheduler not in SCHEDULERS:
            raise OptionError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA shape: rank, alpha, target module names."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha (scaling alpha/r)"})
    targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS, metadata={"help": "target module names"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling alpha/sqrt(r)"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise OptionError(f"LoRA rank must be >= 1, got {self.r}")
        if not self.alpha > 0:
            raise OptionError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise OptionError("LoRA needs at least one target module name")


def pad_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding for training: positions then count from 0 as in generation."""
    width = max(len(f["input_ids"]) for f in features)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

    return {
        "input_ids": padded("input_ids", pad_id),
        "attention_mask": padded("attention_mask", 0),
        "labels": padded("labels", IGNORE_INDEX),
    }


def fit(model, tokenizer, examples: list[dict], config: TrainConfig) -> None:
    """Train ``model`` in place on tokenized ``examples`` with transformers' Trainer."""
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    if not examples:
        raise OptionError("no training examples")
    set_seed(config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with tempfile.TemporaryDirectory(prefix="csulora-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup,
            max_grad_norm=config.grad_clip if config.grad_clip > 0 else None,
            lr_scheduler_type=config.scheduler,
            seed=config.seed,
            data_seed=config.seed,
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=not config.progress,
            use_cpu=next(model.parameters()).device.type == "cpu",  # train where load_model put it
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=lambda feats: pad_batch(feats, pad_id),
        )
        if not config.progress:
            # Without tqdm, Trainer prints every log dict -- including the end-of-training
            # summary ({'train_runtime': ...}) even with logging_strategy="no".
            trainer.remove_callback(PrinterCallback)
        trainer.train()
    model.eval()


def check_training_output(out_dir: str | os.PathLike, force: bool, inputs: Mapping[str, str | os.PathLike]) -> Path:
    """OUTDIR may be replaced only with ``force``, and never be, contain or lie inside an input (the
    model, a data file; ``inputs`` maps each one's flag to its path), ``--force`` or not: before any work."""
    # Apart first: "exists, use --force" would be the wrong advice for an output that is an input.
    check_apart({"-o/--output": out_dir}, inputs)
    return check_output_dir(out_dir, force)


def _freeze_embeddings(model) -> None:
    # Tied lm_head shares this parameter, so it stays fixed too (as in the pilot).
    model.get_input_embeddings().weight.requires_grad_(False)


def sort_target_modules(config_file: Path) -> None:
    """PEFT keeps ``target_modules`` as a set and writes it in hash order, which differs from one
    process to the next; sorted, the same training run writes the same bytes."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_train_record(folder: Path, **record) -> None:
    (folder / "train_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def train_full(
    model_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    *,
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Full fine-tune; writes a safetensors checkpoint and the tokenizer to ``out_dir``.

    ``device``/``dtype``: where and in what precision (defaults: CUDA when present, else
    CPU; float32), as :func:`csulora.io.modeling.load_model`.
    """
    from csulora.io.modeling import load_model, resolve_device, resolve_dtype

    resolve_device(device)  # a bad --device or --dtype fails before any work
    resolve_dtype(dtype)
    check_training_output(out_dir, force, {"MODEL": model_dir, "--data": data_path})
    pairs = load_pairs(data_path)
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    if config.freeze_embeddings:
        _freeze_embeddings(model)
    model.train()
    fit(model, tokenizer, tokenize_pairs(tokenizer, pairs, config.max_length), config)
    with atomic_output_dir(out_dir, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_train_record(tmp, method="full", model=str(model_dir), data=str(data_path), config=dataclasses.asdict(config))
    return Path(out_dir)


def train_lora(
    model_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    lora: LoraSettings,
    *,
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> Path:
    """LoRA fine-tune of ``model_dir``; writes a stock PEFT adapter folder to ``out_dir``.

    ``device``/``dtype`` as in :func:`train_full`.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from csulora.io.modeling import load_model, quiet_loading, resolve_device, resolve_dtype

    resolve_device(device)  # a bad --device or --dtype fails before any work
    resolve_dtype(dtype)
    check_training_output(out_dir, force, {"MODEL": model_dir, "--data": data_path})
    pairs = load_pairs(data_path)
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    set_seed(config.seed)  # LoRA A is randomly initialised
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.targets),
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_loading():  # transformers' deprecation notes about its own internals
            model = get_peft_model(model, peft_config)
    except ValueError as exc:
        raise OptionError(f"LoRA targets {', '.join(lora.targets)}: {str(exc).splitlines()[0]}") from None
    model.train()
    fit(model, tokenizer, tokenize_pairs(tokenizer, pairs, config.max_length), config)
    with atomic_output_dir(out_dir, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        sort_target_modules(tmp / "adapter_config.json")
        _write_train_record(
            tmp, method="lora", model=str(model_dir), data=str(data_path),
            config=dataclasses.asdict(config), lora=dataclasses.asdict(lora),
        )
    return Path(out_dir)
