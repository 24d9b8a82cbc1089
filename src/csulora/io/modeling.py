"""Load a safetensors checkpoint (optionally with a PEFT adapter) for generation/scoring.

Pickled weights are refused before transformers sees the folder
(:func:`csulora.io.checkpoints.find_safetensors_files`). An adapter is loaded with stock
PEFT and merged into the weights: a merged model generates as fast as the base. A hub id
where a folder is expected is fetched first (:func:`csulora.io.hub.resolve_model_dir`).

Loading is quiet (:func:`quiet_loading`): transformers' per-load "Loading weights" bar and
its deprecation warning about PEFT's use of its internals say nothing a csulora user can act
on, and a sweep loads a model dozens of times.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from csulora.errors import InputError, OptionError
from csulora.io.checkpoints import CONVERT_HINT, PICKLED_SUFFIXES, check_finite, find_safetensors_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


DEVICE_CHOICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device is None:
        return default_device()
    resolved = torch.device(device)
    if resolved.type not in DEVICE_CHOICES:
        raise OptionError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available on this machine (use --device cpu)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` means float32 (exact reruns; the evidence is computed so); names as in DTYPES.

    A ``torch.dtype`` from the API may also be float64 (tests compare batched and unbatched
    generation in float64, docs/design.md §10); the CLI offers the names of DTYPES only.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (*DTYPES.values(), torch.float64):
            raise OptionError(f"--dtype {dtype} is not supported (choose {', '.join(DTYPES)})")
        return dtype
    if dtype not in DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# transformers 5 deprecated ``PreTrainedModel.is_gradient_checkpointing`` with a FutureWarning, and
# PEFT's ``PeftModel.__init__`` (peft 0.21: ``getattr(model, "is_gradient_checkpointing", True)``)
# reads it each time an adapter is attached: loading one for eval, tune's sweep, get_peft_model in
# training. It is about the libraries' own code, nothing a csulora user can act on; it is the only
# warning loading emits (measured on the pinned versions), and the one message silenced.
CHECKPOINTING_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def no_checkpointing_deprecation() -> Iterator[None]:
    """Within: transformers' ``is_gradient_checkpointing`` FutureWarning is not shown; every
    other warning is. Wrap each call that attaches a PEFT adapter to a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CHECKPOINTING_DEPRECATION, category=FutureWarning)
        yield


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Within: no transformers/hub progress bars, log messages below errors, or the libraries'
    checkpointing FutureWarning (:func:`no_checkpointing_deprecation`). Everything is restored on
    exit (scoped to our own calls)."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with no_checkpointing_deprecation():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_adapter_dir(adapter: str | os.PathLike) -> Path:
    """A PEFT adapter folder with safetensors weights, or a one-line error."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such adapter folder")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise InputError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise InputError(f"{folder}: only pickled adapter weights ({', '.join(pickled)}); {CONVERT_HINT}")
        raise InputError(f"{folder}: no {ADAPTER_WEIGHTS}")
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({exc.msg})") from None
    return folder


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise InputError(f"{model_dir}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def load_model(
    model_dir: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    merge: bool = True,
):
    """(model, tokenizer) ready for inference: eval mode, on ``device`` (default: CUDA if present)
    in ``dtype`` (default float32; see :func:`resolve_device`, :func:`resolve_dtype`).

    ``adapter``: a PEFT adapter folder, loaded with ``PeftModel`` and merged (unless
    ``merge=False``, which keeps a ``PeftModel`` e.g. to keep training it).
    """
    from transformers import AutoModelForCausalLM

    from csulora.io.hub import resolve_model_dir

    device, dtype = resolve_device(device), resolve_dtype(dtype)
    model_dir = resolve_model_dir(model_dir, "MODEL")
    find_safetensors_files(model_dir)  # refuses .bin/.pt with the conversion hint
    if adapter is not None:
        adapter = resolve_model_dir(adapter, "ADAPTER")
        check_adapter_dir(adapter)
    tokenizer = load_tokenizer(model_dir)
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{model_dir}: cannot load the model ({str(exc).splitlines()[0]})") from None
    check_finite_weights(model, model_dir)
    if adapter is not None:
        model = attach_adapter(model, adapter, model_dir=model_dir)
        check_finite_weights(model, adapter, only="lora_")
        if merge:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    return model, tokenizer


def check_finite_weights(model, where: str | os.PathLike, *, only: str | None = None) -> None:
    """Refuse NaN/Inf weights (of parameters whose name contains ``only``, e.g. an adapter's
    ``lora_`` factors) in one line naming ``where`` and the tensor: generating or training with them
    runs to the end and writes numbers that mean nothing. One sum per tensor (checkpoints.check_finite)."""
    for name, param in model.named_parameters():
        if only is None or only in name:
            check_finite(param.detach(), where, name)


def attach_adapter(
    model, adapter: str | os.PathLike, *, adapter_name: str = "default", model_dir: str | os.PathLike | None = None
):
    """``PeftModel.from_pretrained(model, adapter)``, quietly (:func:`quiet_loading`); an adapter that
    does not fit the model is a one-line InputError naming both. The one way csulora attaches an
    adapter (loading for eval, tune's states)."""
    from peft import PeftModel

    try:
        with quiet_loading():
            return PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError) as exc:
        where = model_dir if model_dir is not None else "the model"
        raise InputError(f"{adapter}: adapter does not fit {where} ({str(exc).splitlines()[0]})") from None


def model_identity(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None) -> dict:
    """What was evaluated, for saved generations: resolved paths and file sizes."""
    identity = {"model": str(Path(model_dir).resolve()), "adapter": None}
    if adapter is not None:
        identity["adapter"] = str(Path(adapter).resolve())
    return identity
