"""``csulora calibrate``: the activation statistics of the calibrated correction (docs/design.md §5c).

Once per aligned model and task, run the **aligned** model on two data sets and record, per
target module, the Gram of its inputs on every non-padding token:

- **harmful** (``S_h``): each harmful prompt followed by the aligned model's own greedy
  answer, through the chat template. The answers are generated once, batched, and kept in
  memory (the positions where the refusal is generated are what the induction argument
  of §5c needs covered);
- **task** (``S_t``): the adapter's training data, prompt + response.

Modules that read the same input tensor share one Gram. That is detected from the forward
itself, not from names: one probe forward records the tensor each target module receives,
and modules handed the very same tensor (q/k/v read the attention input, gate/up the MLP
input) form one group, hooked once.

Cost. Per token and group a full Gram costs ``n^2`` multiply-adds against the layer's own
``m n`` (per block ``3 d^2 + f^2`` against ``4 d^2 + 3 d f`` for a Llama block with hidden
``d`` and MLP width ``f``: about one more forward). Only the upper triangle is computed, in
strips of rows (:func:`add_upper_gram_`), which roughly halves that, and the LM head is
skipped (the hooks need the layers' inputs only). Each hook call takes the whole batch's
counted tokens as one matrix, so the products are large GEMMs. Products are float32 on the
CPU and in the model's dtype on CUDA, added to float64 sums once per batch.

Memory. A group needs two ``n x n`` float64 sums (harmful and task); at 7B all groups at
once exceed a 24 GB machine. The groups are then processed in as many passes over the
cached tokens as the memory budget requires (:func:`plan_passes`). Each pass ends its
forwards after the last block it needs, and caches the hidden state where the next pass
starts (``padded tokens x d`` numbers, on the CPU); the next pass replays it instead of
running the blocks before it (:class:`BlockResume`), so several passes cost about one
forward in all. Replaying is used only where a probe forward shows it reproduces the
model's own (:func:`replay_is_exact`); otherwise every pass recomputes the earlier blocks.
The sums become :class:`~csulora.types.ModuleCalibration` (normalised, dense or spiked:
:func:`csulora.linalg.gram.calibration_moments`), are kept in float32 as the file stores them, and
are written with :func:`csulora.io.calibration_file.save_calibration`.

Data rules (§5c): the task data is the adapter's *training* data, never a split ``tune``
selects on or a test split; the harmful prompts must be disjoint from every prompt set
``tune`` or ``eval`` scores (:func:`csulora.eval.calibration_sets.check_disjoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from csulora.version import __version__
from csulora.references.activations import MaskedInputHooks, StopForward, decoder_body, run_batches
from csulora.errors import InputError, OptionError
from csulora.eval.generation import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, generate_responses
from csulora.eval.prompts import PYRIT_INSTALL, Prompt, normalise_prompt
from csulora.eval.specs import load_prompts
from csulora.eval.tasks import date_task, date_task_splits, load_task
from csulora.linalg.gram import calibration_moments
from csulora.io.atomic import check_output_file
from csulora.io.calibration_file import MODEL_FINGERPRINT_KEY, save_calibration
from csulora.io.checkpoints import CheckpointReader, decoder_linear_modules, layer_index, target_list
from csulora.io.fingerprint import model_fingerprint
from csulora.io.modeling import load_model, resolve_device, resolve_dtype
from csulora.training.data import chat_prompt_ids, response_ids
from csulora.types import ModuleCalibration, SecondMoment

# The Grams of one pass may take this share of the memory free after the model is loaded.
MEMORY_FRACTION = 0.5
_FALLBACK_BUDGET = 8 << 30  # when the free memory cannot be read
# Rows per strip of the upper-triangle Gram products (add_upper_gram_): 256 was fastest of
# 128..1024 at n = 576, 1536 and 4096 on one CPU thread.
GRAM_STRIP = 256
PROBE_TOKENS = 16  # length of the probe forward that finds the shared inputs
TASK_TRAIN_SPLIT = "train"
_HELD_OUT_ROLE = {"validation": "the split tune selects on", "test": "a test split"}  # the other date splits
DEFAULT_HARMFUL_SPECS = ("advbench:align", "requests")  # calibration_harmful_prompts()


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GramGroup:
    """Target modules that read one input tensor; ``modules[0]`` is the one hooked."""

    name: str
    modules: tuple[str, ...]  # in the order the forward reaches them
    n: int  # input size
    calls: int = 1  # times the modules run per forward (1 for every decoder linear we know)

    @property
    def sum_bytes(self) -> int:
        """The harmful and the task sum, float64, held together while the pass runs."""
        return 2 * self.n * self.n * 8


@dataclass
class CalibrationResult:
    """What ``calibrate`` wrote and measured."""

    path: Path
    modules: dict[str, str]  # module -> Gram group
    groups: list[GramGroup]
    harmful_tokens: int
    task_tokens: int
    passes: int
    seconds: dict[str, float]
    answers: list[str] = field(repr=False)  # the aligned model's answer to each harmful prompt, in order
    info: dict[str, Any] = field(repr=False, default_factory=dict)  # the metadata written to the file


# -- inputs: everything that can be refused is refused before a model is loaded -----------------
def pyrit_installed() -> bool:
    try:
        importlib.metadata.distribution("pyrit")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def spec_list(specs: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list[str] | None:
    """SPECs as strings; one SPEC given alone is a list of one."""
    if specs is None:
        return None
    return [str(specs)] if isinstance(specs, (str, os.PathLike)) else [str(s) for s in specs]


def harmful_prompts(specs: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list[Prompt]:
    """The harmful calibration prompts, checked disjoint from every scored set (docs/design.md §5c).

    ``None``: AdvBench ``align`` + ``requests``; otherwise the prompts of every SPEC in order
    (they replace the default). Both need pyrit: for AdvBench itself, or to check the user's
    prompts against the AdvBench and airt validation and test splits.
    """
    from csulora.eval.calibration_sets import calibration_harmful_prompts, check_disjoint, held_out_sets

    specs = spec_list(specs)
    if specs == []:
        raise OptionError("--harmful needs at least one SPEC")
    if not pyrit_installed():
        if specs is None:
            raise InputError(
                f"the default harmful prompts (AdvBench align + requests) need pyrit: run `{PYRIT_INSTALL}`, "
                "or give --harmful SPEC"
            )
        raise InputError(
            f"checking --harmful against the AdvBench/airt validation and test splits needs pyrit: run `{PYRIT_INSTALL}`"
        )
    prompts = calibration_harmful_prompts() if specs is None else [p for s in specs for p in load_prompts(s)]
    check_disjoint(prompts, held_out_sets())
    return prompts


def task_pairs(spec: str | os.PathLike) -> list[dict]:
    """The adapter's task data, prompt + response: a JSONL file or ``date:train``.

    Refused: the splits ``tune`` selects on and the test splits (``date:validation``,
    ``date``/``date:test``), a JSONL file holding one of their prompts, and prompt sets
    (no responses).
    """
    text = str(spec)
    path = Path(text)
    if not path.is_file() and not path.suffix:
        name, _, split = text.partition(":")
        if name == "date":
            split = split or "test"  # what a bare "date" means everywhere else (eval/tasks.load_task)
            if split == TASK_TRAIN_SPLIT:
                return date_task(split)
            role = _HELD_OUT_ROLE.get(split, "not a split")
            raise InputError(f"--task {text}: {role}; calibrate on the adapter's training data (date:train or its JSONL)")
        raise InputError(
            f"--task {text}: not task data; give the adapter's training data "
            '(JSONL of {"prompt", "response"}) or date:train'
        )
    pairs = load_task(text)  # InputError naming file:line for a record without prompt/response
    _check_task_not_held_out(pairs, path)
    return pairs


def _check_task_not_held_out(pairs: Sequence[dict], file: Path) -> None:
    held_out = {
        normalise_prompt(item["prompt"]): f"date:{split}"
        for split, items in date_task_splits().items()
        if split in _HELD_OUT_ROLE
        for item in items
    }
    for number, pair in enumerate(pairs, start=1):
        where = held_out.get(normalise_prompt(pair["prompt"]))
        if where is not None:
            raise InputError(
                f"{file}: record {number} is a prompt of {where}; calibrate on the adapter's training data, "
                "never on a split tune selects on or a test split"
            )


def target_modules(aligned: str | os.PathLike, targets: Iterable[str] | str | None) -> list[str]:
    """The decoder linear layers to calibrate (names as in the checkpoint), from its header only."""
    wanted = target_list(targets)
    with CheckpointReader(aligned) as reader:
        modules = decoder_linear_modules(reader, wanted)
    if not modules:
        if wanted is None:
            raise InputError(f"{aligned}: no linear layers in decoder blocks")
        raise OptionError(f"--targets {','.join(wanted)} matches no linear layer of {aligned}'s decoder blocks")
    return modules


def _check_options(max_new_tokens: int, batch_size: int, memory_budget_gb: float | None) -> None:
    if max_new_tokens < 1:
        raise OptionError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {batch_size}")
    if memory_budget_gb is not None and not memory_budget_gb > 0:
        raise OptionError(f"--memory-budget must be > 0 GB, got {memory_budget_gb}")


def set_digest(records: Iterable[Any]) -> str:
    """sha256 of a data set's content in order (JSON of each record, one a line)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# -- which modules share an input ---------------------------------------------------------------
def linear_modules(model: nn.Module, names: Sequence[str], where: str | os.PathLike) -> dict[str, nn.Linear]:
    found = dict(model.named_modules())
    linears = {}
    for name in names:
        module = found.get(name)
        if not isinstance(module, nn.Linear):
            raise InputError(f"{where}: module {name} is not a linear layer of the loaded model")
        linears[name] = module
    return linears


def _input_key(x: Tensor) -> tuple:
    # Same memory, shape and layout: the same tensor (or a view identical to it). The probe
    # keeps every recorded tensor alive, so an address cannot be reused within the forward.
    return (x.data_ptr(), x.dtype, tuple(x.shape), tuple(x.stride()))


@torch.no_grad()
def shared_input_groups(model: nn.Module, linears: Mapping[str, nn.Linear], probe_ids: Sequence[int]) -> list[GramGroup]:
    """Group the modules by the input tensor they receive in one probe forward, in forward order.

    A module that runs more than once per forward gets a group of its own (its Gram sums all
    its calls); a module that never runs is an error (its statistics would be empty).
    """
    seen: dict[str, list[Tensor]] = {name: [] for name in linears}
    first_calls: list[str] = []

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple) -> None:
            if not seen[name]:
                first_calls.append(name)
            seen[name].append(inputs[0])

        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in linears.items()]
    device = next(model.parameters()).device
    try:
        decoder_body(model)(input_ids=torch.tensor([list(probe_ids)], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    idle = [name for name, calls in seen.items() if not calls]
    if idle:
        raise InputError(f"module {idle[0]} never runs in the model's forward pass; it cannot be calibrated")
    members: list[list[str]] = []
    by_input: dict[tuple, list[str]] = {}
    for name in first_calls:
        calls = seen[name]
        key = _input_key(calls[0])
        if len(calls) == 1 and key in by_input:
            by_input[key].append(name)
            continue
        members.append([name])
        if len(calls) == 1:
            by_input[key] = members[-1]
    return [
        GramGroup(group_name(names), tuple(names), linears[names[0]].in_features, calls=len(seen[names[0]]))
        for names in members
    ]


def group_name(modules: Sequence[str]) -> str:
    """``model.layers.3.self_attn.q_proj+k_proj+v_proj``; a lone module keeps its own name."""
    if len(modules) == 1:
        return modules[0]
    parents = {m.rpartition(".")[0] for m in modules}
    if len(parents) == 1:
        parent = parents.pop()
        leaves = "+".join(m.rpartition(".")[2] for m in modules)
        return f"{parent}.{leaves}" if parent else leaves
    return "+".join(modules)


# -- the statistics pass --------------------------------------------------------------------------
def add_upper_gram_(total: Tensor, x: Tensor, strip: int = GRAM_STRIP) -> None:
    """``total += x^T x`` on the strips of rows ``i:i+strip`` from column ``i`` on (the upper
    triangle, diagonal blocks whole); :func:`mirror_upper_` fills in the rest once at the end.

    A Gram is symmetric, so half of ``x^T x`` is redundant: the strips cost ``(1 + strip/n)/2``
    of the full product, and measured on one CPU thread (2048 tokens) 0.55x at n = 1536 and
    0.41x at n = 4096 (the strips also run closer to peak than the transposed full product).
    """
    n = x.shape[1]
    for start in range(0, n, strip):
        total[start : start + strip, start:].add_(x[:, start : start + strip].T @ x[:, start:])


def mirror_upper_(total: Tensor, strip: int = GRAM_STRIP) -> Tensor:
    """Make a sum kept by :func:`add_upper_gram_` the full symmetric matrix, in place.

    One strip of rows at a time: the upper part of the strip is copied, transposed, into
    the columns below it, and the diagonal block is mirrored within itself, so every
    entry below the diagonal becomes exactly its upper twin. The whole-matrix ``triu`` and
    transposed add it replaces needed an n x n temporary and a transposed read of the whole
    sum; on 7B shapes (n = 4096 and 11008) the 512-token statistics pass of
    docs/benchmarks.md went from 81 to 57 s of CPU with this change.
    """
    n = total.shape[0]
    for start in range(0, n, strip):
        stop = min(start + strip, n)
        block = total[start:stop, start:stop]
        block.copy_(block.triu() + block.triu(1).T)
        total[stop:, start:stop].copy_(total[start:stop, stop:].T)
    return total


class GroupGramSums(MaskedInputHooks):
    """Adds ``x^T x`` of the counted rows into one float64 sum per group (hooked on its first module).

    The sums hold the upper triangle only (:func:`add_upper_gram_`) until :func:`mirror_upper_`.

    ``stop_after``: the module after which nothing of this pass is left to see; its hook
    ends the forward (:class:`~csulora.references.activations.StopForward`).
    """

    def __init__(
        self,
        groups: Sequence[GramGroup],
        linears: Mapping[str, nn.Linear],
        *,
        device: torch.device,
        product_dtype: torch.dtype,
        stop_after: str | None,
        strip: int = GRAM_STRIP,
    ) -> None:
        super().__init__({g.modules[0]: linears[g.modules[0]] for g in groups})
        self.group_of = {g.modules[0]: g.name for g in groups}
        self.sums = {g.name: torch.zeros(g.n, g.n, dtype=torch.float64, device=device) for g in groups}
        self.rows = {g.name: 0 for g in groups}
        self.product_dtype = product_dtype
        self.stop_after = stop_after
        self.strip = strip

    def observe(self, name: str, module: nn.Module, x: Tensor) -> None:
        group = self.group_of[name]
        x = x.to(self.product_dtype)
        add_upper_gram_(self.sums[group], x, self.strip)  # float32 (or model dtype) products, float64 sum
        self.rows[group] += int(x.shape[0])
        if name == self.stop_after:
            raise StopForward


def accumulate_sums(
    model: nn.Module,
    examples: Sequence[Mapping],
    groups: Sequence[GramGroup],
    linears: Mapping[str, nn.Linear],
    *,
    pad_id: int,
    batch_size: int,
    product_dtype: torch.dtype,
    progress: bool = True,
    desc: str = "statistics",
    strip: int = GRAM_STRIP,
    resume: BlockResume | None = None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Gram sums (float64, on the model's device) and token counts of ``groups`` over ``examples``.

    Every token of an example counts unless it has ``labels`` (then those not ``-100``);
    padding never counts. ``strip``: rows per product strip (:func:`add_upper_gram_`).
    ``resume``: skip the blocks before this pass and record a block's output for the next
    (:class:`BlockResume`; several passes only). The forward ends as soon as nothing of this
    pass is left to see: after its last group's input, or after the recorded block.
    """
    device = next(model.parameters()).device
    record_at = resume.record_at if resume is not None else None
    stop_at_record = record_at is not None and record_at >= block_index(groups[-1].modules[0])
    single_calls = all(g.calls == 1 for g in groups)
    stop_after = groups[-1].modules[0] if single_calls and not stop_at_record else None
    hooks = GroupGramSums(groups, linears, device=device, product_dtype=product_dtype, stop_after=stop_after, strip=strip)
    with contextlib.ExitStack() as stack:
        sums = stack.enter_context(hooks)
        if resume is not None and resume.cached is not None and resume.start > 0:
            stack.enter_context(replaying_blocks(resume.blocks[: resume.start], resume.cached, device))
        if resume is not None and record_at is not None:
            stack.enter_context(recording_block_output(resume.blocks[record_at], resume.recorded, stop=stop_at_record))
        run_batches(
            model, examples, sums, pad_id=pad_id, batch_size=batch_size, progress=progress, desc=desc,
            longest_first=True,
        )  # fmt: skip
    return {name: mirror_upper_(total) for name, total in sums.sums.items()}, sums.rows


# -- several passes: each resumes at its first block from the hidden states the last one cached ----
def block_index(module: str) -> int:
    """The decoder block a target module belongs to (targets are always inside a block)."""
    index = layer_index(module)
    if index is None:
        raise ValueError(f"{module} is not inside a decoder block")
    return index


def decoder_blocks(model: nn.Module, modules: Iterable[str]) -> list[nn.Module] | None:
    """The decoder blocks, in order, of the one ``nn.ModuleList`` the module names run through
    (``model.layers``); None when the names do not point to exactly one."""
    parents = set()
    for name in modules:
        index = layer_index(name)  # io/checkpoints owns the rule: the first ".N." of the name
        if index is None:
            return None
        parents.add(name.split(f".{index}.", 1)[0])
    container = dict(model.named_modules()).get(parents.pop()) if len(parents) == 1 else None
    return list(container) if isinstance(container, nn.ModuleList) else None


@dataclass
class BlockResume:
    """How one pass skips the blocks before it and caches a block's output for the next pass.

    ``blocks[:start]`` do not compute: each returns, batch after batch, ``cached`` (the output
    of block ``start - 1``, recorded by the previous pass over the same batches). The output
    of ``blocks[record_at]`` is appended to ``recorded`` (on the CPU) for the next pass.
    A cache costs ``padded tokens x d`` numbers, small beside a Gram's ``n^2``.
    """

    blocks: Sequence[nn.Module]
    start: int = 0
    cached: Sequence[Any] | None = None
    record_at: int | None = None
    recorded: list[Any] = field(default_factory=list)


def _moved(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to(device, copy=True) if str(device) == "cpu" else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    return value


@contextlib.contextmanager
def replaying_blocks(blocks: Sequence[nn.Module], outputs: Sequence[Any], device: torch.device) -> Iterator[None]:
    """``blocks`` (the first k of the decoder) return the recorded output of block k-1, one
    batch after another, instead of computing; block k then starts from it."""
    batches = iter(outputs)
    current: list[Any] = [None]

    def first(*_args, **_kwargs):
        current[0] = _moved(next(batches), device)
        return current[0]

    def rest(*_args, **_kwargs):
        return current[0]

    for i, block in enumerate(blocks):
        block.forward = first if i == 0 else rest  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@contextlib.contextmanager
def recording_block_output(block: nn.Module, into: list[Any], *, stop: bool) -> Iterator[None]:
    """Append ``block``'s output of every batch to ``into`` (CPU); ``stop``: end the forward there."""

    def record(_module: nn.Module, _args: tuple, output: Any) -> None:
        into.append(_moved(output, "cpu"))
        if stop:
            raise StopForward

    handle = block.register_forward_hook(record)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def replay_is_exact(
    model: nn.Module, blocks: Sequence[nn.Module], linears: Mapping[str, nn.Linear], probe_ids: Sequence[int]
) -> bool:
    """Whether skipping the first half of the blocks by replaying a recorded output leaves every
    later module's input as it was (one probe forward each way). False for a model whose
    blocks share state or are not called in order: its passes then recompute the earlier blocks.
    """
    middle = len(blocks) // 2
    later = {name: module for name, module in linears.items() if block_index(name) >= middle}
    if middle == 0 or not later:
        return False
    device = next(model.parameters()).device
    ids = torch.tensor([list(probe_ids)], device=device)

    def inputs_seen(replay: Sequence[Any] | None, recorded: list[Any]) -> dict[str, Tensor]:
        seen: dict[str, Tensor] = {}
        handles = [
            module.register_forward_pre_hook(lambda _m, inputs, name=name: seen.setdefault(name, inputs[0].clone()))
            for name, module in later.items()
        ]
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(recording_block_output(blocks[middle - 1], recorded, stop=False))
                if replay is not None:
                    stack.enter_context(replaying_blocks(blocks[:middle], replay, device))
                decoder_body(model)(input_ids=ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    recorded: list[Any] = []
    reference = inputs_seen(None, recorded)
    try:
        replayed = inputs_seen(recorded, [])
    except Exception:  # noqa: BLE001 (a capability probe: any failure means "recompute instead")
        return False
    return reference.keys() == replayed.keys() and all(
        torch.allclose(reference[n], replayed[n], rtol=1e-5, atol=1e-6 * float(reference[n].abs().max()))
        for n in reference
    )


def plan_passes(groups: Sequence[GramGroup], budget_bytes: int) -> list[list[GramGroup]]:
    """Consecutive groups (forward order) whose sums fit the budget together; a group larger
    than the budget gets a pass of its own."""
    passes: list[list[GramGroup]] = []
    current: list[GramGroup] = []
    used = 0
    for group in groups:
        if current and used + group.sum_bytes > budget_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(group)
        used += group.sum_bytes
    if current:
        passes.append(current)
    return passes


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now (None when it cannot be read)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the generation are free for the sums
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(device: torch.device) -> int:
    """Half of the memory free after the model is loaded (8 GiB when that cannot be read)."""
    free = free_memory_bytes(device)
    return int(free * MEMORY_FRACTION) if free else _FALLBACK_BUDGET


def product_dtype_for(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """float32 products on the CPU; on CUDA the model's dtype (docs/design.md §5c)."""
    return model_dtype if device.type == "cuda" else torch.float32


def _stored_form(moment: SecondMoment) -> SecondMoment:
    """On the CPU in float32, as the file stores it: finished groups wait there for the writer,
    and float32 halves what they hold (docs/design.md §5c: products are float32 anyway)."""
    moved = {
        key: getattr(moment, key).to(device="cpu", dtype=torch.float32)
        for key in ("matrix", "U", "L")
        if getattr(moment, key) is not None
    }
    return replace(moment, **moved)


def build_calibration(group: GramGroup, harmful: tuple[Tensor, int], task: tuple[Tensor, int]) -> ModuleCalibration:
    """One group's statistics from its sums: normalised, dense or spiked (:func:`csulora.linalg.gram.calibration_moments`)."""
    try:
        built = calibration_moments(group.name, harmful[0], harmful[1], task[0], task[1])
    except ValueError as exc:
        raise InputError(f"calibration of {group.name}: {exc}") from None
    return replace(built, harmful=_stored_form(built.harmful), task=_stored_form(built.task))


# -- the API -------------------------------------------------------------------------------------
def _logger(progress: bool):
    def log(message: str) -> None:
        if progress:
            print(f"calibrate: {message}", file=sys.stderr, flush=True)

    return log


def _size(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 30):.1f} GiB" if n_bytes >= 1 << 30 else f"{n_bytes / (1 << 20):.1f} MiB"


def _pass_span(groups: Sequence[GramGroup]) -> str:
    first, last = groups[0].modules[0], groups[-1].modules[-1]
    return first if first == last else f"{first} .. {last}"


def harmful_sequences(tokenizer, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[dict]:
    """Each harmful prompt through the chat template, then the aligned model's own answer and
    end of turn: the positions where the refusal is generated are covered (docs/design.md §5c)."""
    return [{"input_ids": chat_prompt_ids(tokenizer, p.text) + response_ids(tokenizer, a)} for p, a in zip(prompts, answers)]


def task_sequences(tokenizer, pairs: Sequence[Mapping]) -> list[dict]:
    """Task prompt + response, tokenized as for training (docs/design.md §10)."""
    return [{"input_ids": chat_prompt_ids(tokenizer, p["prompt"]) + response_ids(tokenizer, p["response"])} for p in pairs]


@dataclass(frozen=True)
class StatisticsPlan:
    """The Gram groups, the passes they take, and the decoder blocks later passes resume at
    (None: one pass, or a model whose blocks cannot be skipped; then passes recompute them)."""

    groups: list[GramGroup]
    passes: list[list[GramGroup]]
    blocks: list[nn.Module] | None = None


def plan_statistics(
    model: nn.Module, linears: Mapping[str, nn.Linear], examples: Sequence[Mapping], budget: int, log
) -> StatisticsPlan:
    """Groups from a probe forward on the first example, passes from the memory budget, and
    whether later passes may start from cached hidden states (checked by another probe)."""
    probe = examples[0]["input_ids"][:PROBE_TOKENS]
    groups = shared_input_groups(model, linears, probe)
    passes = plan_passes(groups, budget)
    blocks = None
    if len(passes) > 1 and all(g.calls == 1 for g in groups):
        blocks = decoder_blocks(model, linears)
        if blocks is not None and not replay_is_exact(model, blocks, linears, probe):
            blocks = None
    needed = sum(g.sum_bytes for g in groups)
    if len(passes) == 1:
        plan = "one pass over the tokens"
    elif blocks is not None:
        plan = f"{len(passes)} passes over the tokens, each starting at its first layer from hidden states the last one cached"
    else:
        plan = f"{len(passes)} passes over the tokens, each running the model from the start up to its last layer"
    log(f"{len(linears)} modules in {len(groups)} Gram groups; their sums need {_size(needed)}, budget {_size(budget)}: {plan}")
    return StatisticsPlan(groups=groups, passes=passes, blocks=blocks)


def collect_statistics(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    plan: StatisticsPlan,
    harmful: Sequence[Mapping],
    task: Sequence[Mapping],
    *,
    pad_id: int,
    batch_size: int,
    product_dtype: torch.dtype,
    progress: bool,
    log,
) -> dict[str, ModuleCalibration]:
    """Every group's statistics, pass by pass: harmful sums, task sums, then the stored form."""
    calibrations: dict[str, ModuleCalibration] = {}
    common = {"pad_id": pad_id, "batch_size": batch_size, "product_dtype": product_dtype, "progress": progress}
    passes = plan.passes
    cached: dict[str, Sequence[Any] | None] = {"harmful": None, "task": None}
    for number, part in enumerate(passes, start=1):
        label = f"pass {number}/{len(passes)}" if len(passes) > 1 else "statistics"
        if len(passes) > 1:
            log(f"{label}: {len(part)} groups, {_pass_span(part)}")
        sums = {}
        for which, examples in (("harmful", harmful), ("task", task)):
            resume = None
            if plan.blocks is not None:
                following = block_index(passes[number][0].modules[0]) if number < len(passes) else None
                resume = BlockResume(
                    plan.blocks, start=block_index(part[0].modules[0]), cached=cached[which],
                    record_at=following - 1 if following else None,
                )  # fmt: skip
            sums[which] = accumulate_sums(
                model, examples, part, linears, desc=f"{label}: {which}", resume=resume, **common
            )
            cached[which] = resume.recorded if resume is not None and resume.record_at is not None else None
        (h_sums, h_rows), (t_sums, t_rows) = sums["harmful"], sums["task"]
        for group in part:  # pop: each group's float64 sums are freed as soon as it is built
            calibrations[group.name] = build_calibration(
                group, (h_sums.pop(group.name), h_rows[group.name]), (t_sums.pop(group.name), t_rows[group.name])
            )
    return calibrations


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[key] = time.perf_counter() - started


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def calibrate(
    aligned: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    task: str | os.PathLike,
    harmful: Sequence[str | os.PathLike] | str | None = None,
    targets: Iterable[str] | str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    memory_budget_gb: float | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    progress: bool = True,
) -> CalibrationResult:
    """Write the calibration statistics of ``aligned`` for one task to ``out_file`` (docs/design.md §5c).

    ``task``: the adapter's training data (JSONL of prompt/response, or ``date:train``);
    ``harmful``: prompt SPECs replacing the default AdvBench ``align`` + ``requests``;
    ``targets``: module names or suffixes (default every linear layer of the decoder blocks);
    ``memory_budget_gb``: how much the Gram sums of one pass may take (default half the
    memory free once the model is loaded); more groups than fit are done in several passes
    over the tokens. The output is written atomically; an existing one needs ``force``.
    """
    log = _logger(progress)
    out = check_output_file(out_file, force)
    _check_options(max_new_tokens, batch_size, memory_budget_gb)
    run_device, model_dtype = resolve_device(device), resolve_dtype(dtype)
    modules = target_modules(aligned, targets)
    prompts = harmful_prompts(harmful)
    pairs = task_pairs(task)

    seconds: dict[str, float] = {}
    with _timed(seconds, "fingerprint_and_load"):
        fingerprint = model_fingerprint(aligned)
        model, tokenizer = load_model(aligned, device=run_device, dtype=model_dtype)
        linears = linear_modules(model, modules, aligned)
    with _timed(seconds, "generation"):
        answers = generate_responses(
            model, tokenizer, [p.text for p in prompts], batch_size=batch_size, max_new_tokens=max_new_tokens,
            progress=progress, desc="aligned answers",
        )  # fmt: skip
    with _timed(seconds, "statistics"):
        harmful_examples = harmful_sequences(tokenizer, prompts, answers)
        task_examples = task_sequences(tokenizer, pairs)
        budget = int(memory_budget_gb * (1 << 30)) if memory_budget_gb is not None else default_memory_budget(run_device)
        plan = plan_statistics(model, linears, task_examples, budget, log)
        calibrations = collect_statistics(
            model, linears, plan, harmful_examples, task_examples,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, batch_size=batch_size,
            product_dtype=product_dtype_for(run_device, model_dtype), progress=progress, log=log,
        )  # fmt: skip

    groups, passes = plan.groups, plan.passes
    module_groups = {m: g.name for g in groups for m in g.modules}
    harmful_tokens = sum(len(e["input_ids"]) for e in harmful_examples)
    task_tokens = sum(len(e["input_ids"]) for e in task_examples)
    info = {
        "csulora_version": __version__,
        MODEL_FINGERPRINT_KEY: fingerprint,
        "aligned": str(Path(aligned).resolve()),
        "targets": target_list(targets),
        "modules": len(module_groups),
        "groups": len(groups),
        "generation": {
            "max_new_tokens": max_new_tokens, "greedy": True, "chat_template": True, "batch_size": batch_size,
        },
        "device": run_device.type,
        "dtype": _dtype_name(model_dtype),
        "products": _dtype_name(product_dtype_for(run_device, model_dtype)),
        "accumulation": "float64",
        "harmful": {
            "specs": spec_list(harmful) or list(DEFAULT_HARMFUL_SPECS),
            "prompts": len(prompts),
            "sha256": set_digest(p.text for p in prompts),
            "answers_sha256": set_digest(answers),
            "tokens": harmful_tokens,
        },
        "task": {
            "spec": str(task),
            "examples": len(pairs),
            "sha256": set_digest({"prompt": p["prompt"], "response": p["response"]} for p in pairs),
            "tokens": task_tokens,
        },
        "passes": len(passes),
        "passes_resume_from_cached_hidden_states": plan.blocks is not None,
        "memory_budget_bytes": budget,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    path = save_calibration(out, calibrations, module_groups, info, force=force)
    log(f"wrote {out}")
    return CalibrationResult(
        path=path,
        modules=module_groups,
        groups=groups,
        harmful_tokens=harmful_tokens,
        task_tokens=task_tokens,
        passes=len(passes),
        seconds=seconds,
        answers=answers,
        info=info,
    )
