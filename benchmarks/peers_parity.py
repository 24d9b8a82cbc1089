"""Parity: csulora's Safe Delta and Antidote against the published code, run side by side on CPU.

    python -m benchmarks.peers_parity --safedelta DIR --antidote DIR [--shapes small 7b] \
        [--out benchmarks/results/peers_parity.json]
    python -m benchmarks.peers_parity --table benchmarks/results/peers_parity.json   # docs' tables

``--safedelta DIR``: a checkout of github.com/ColinLu50/SafeDelta (``llama2/safedelta/safedelta_runner.py``,
class ``SafeDeltaRunner``); ``--antidote DIR``: a checkout of github.com/git-disl/Antidote (``utils.py``,
function ``prune_wanda_outlier``). Neither is vendored: the files are imported by path from the
checkout, run on synthetic weights and statistics, and compared with
``csulora.methods.safedelta`` / ``csulora.methods.antidote`` on the same inputs (docs/peers.md).

Patches applied at run time, nothing else changed (their files are never edited):

- Safe Delta: ``safedelta_runner.py`` imports ``datasets.load_dataset`` and
  ``utils.prompt_utils.get_prompt_template`` at module level for its data loaders, which are not
  called here; while the file is imported, those two names come from stand-in modules (``datasets``
  is not installed, and ``llama2/utils/__init__.py`` pulls in FSDP training code).
  ``adjust_delta`` ends with ``torch.cuda.synchronize()``: a no-op during the call (CPU only).
  The runner is called as ``run_safedelta.py`` calls it: ``adjust_delta(s, percdamp=0.01,
  blocksize=2048)``. Each setting is also run with ``torch.argsort`` made stable during the call
  ("published, stable ties"): the published sort is unstable, so which rows of a block's boundary
  column are kept is implementation-defined; with a stable sort its ties fall in flat-index
  order, ours.
- Antidote: none. ``prune_wanda_outlier(args, model, dataloader, device=cpu)`` hooks the linears
  of a stand-in model: an embedding table holding the activations and one decoder layer holding the
  pruned linears (``self_attn.{q,k,v}_proj`` for a full fine-tune, ``...lora_A/B.default`` for an
  adapter). The masks are applied as ``train.py`` applies them, ``weight *= 1 - mask``.

Statistics: Safe Delta's ``H`` is accumulated by the runner's own ``add_batch`` from activations on
the small shape (ours: :func:`csulora.linalg.gram.normalised_gram` of the same activations, so the scale
mapping is exercised), and set directly on the 7B-like shapes (a diagonal plus rank-64 Gram;
accumulating n = 11008 activations would take minutes). Antidote's statistics always come from
its hooks over the activations (ours: the diagonal, or for ``lora_B`` the Gram, of the same
activations). Antidote's weights are bfloat16-representable, as in real checkpoints, so
``W_ft - W_aligned`` is exact in float32 and both sides score the same ``W_ft``; Safe Delta's are
float32 (an update of ~1e-4 on weights of ~0.02 would round to whole bfloat16 ulps).

Per case it records the largest absolute and relative difference of the corrected update
``X = W' - W_aligned``, the entries kept (Safe Delta: at their fine-tuned value) or pruned
(Antidote) by each side and their agreement (shared / either), and the seconds each side took.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from csulora.linalg.gram import normalised_gram
from csulora.methods.antidote import antidote_dense_, antidote_factors
from csulora.methods.safedelta import safe_delta_, safety_factor
from csulora.types import SecondMoment

SAFEDELTA_FILE = Path("llama2/safedelta/safedelta_runner.py")
ANTIDOTE_FILE = Path("utils.py")
SEQUENCE_TOKENS = 128  # tokens per calibration sequence fed to the published hooks


# -- loading the published code --------------------------------------------------------------------
def _import_by_path(path: Path, name: str, stand_ins: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    if not path.is_file():
        raise SystemExit(f"{path}: not found; give a checkout of the published repository")
    saved = {key: sys.modules.get(key) for key in stand_ins or {}}
    sys.modules.update(stand_ins or {})
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


def _stand_in(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _unavailable(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a stand-in for a data loader the parity benchmark does not call")


def load_safedelta(directory: Path) -> type:
    """``SafeDeltaRunner`` from the checkout, its two data-loader imports stood in for."""
    utils = _stand_in("utils", __path__=[])
    stand_ins = {
        "datasets": _stand_in("datasets", load_dataset=_unavailable),
        "utils": utils,
        "utils.prompt_utils": _stand_in("utils.prompt_utils", get_prompt_template=_unavailable),
    }
    return _import_by_path(directory / SAFEDELTA_FILE, "published_safedelta_runner", stand_ins).SafeDeltaRunner


def load_antidote(directory: Path) -> Callable[..., dict]:
    return _import_by_path(directory / ANTIDOTE_FILE, "published_antidote_utils").prune_wanda_outlier


@contextlib.contextmanager
def _patched_torch(*, stable_argsort: bool) -> Iterator[None]:
    """No CUDA synchronisation on CPU; optionally a stable ``torch.argsort``."""
    synchronize, argsort = torch.cuda.synchronize, torch.argsort
    torch.cuda.synchronize = lambda *args, **kwargs: None
    if stable_argsort:
        torch.argsort = lambda *args, **kwargs: argsort(*args, **{**kwargs, "stable": True})
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.argsort = synchronize, argsort


# -- inputs ------------------------------------------------------------------------------------------
def _bf16_randn(*shape: int, generator: torch.Generator, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * std).bfloat16().float()


def activations(tokens: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """Token activations with unequal input energies (log-normal scales) and a few shared directions."""
    scales = torch.exp(0.8 * torch.randn(n, generator=generator))
    shared = torch.randn(tokens, 8, generator=generator) @ torch.randn(8, n, generator=generator)
    return (torch.randn(tokens, n, generator=generator) + 0.5 * shared) * scales


def spiked_gram(n: int, generator: torch.Generator) -> torch.Tensor:
    """A float64 Gram: unequal diagonal plus 64 shared directions (full rank)."""
    G = torch.randn(n, 64, generator=generator, dtype=torch.float64)
    diagonal = torch.exp(0.8 * torch.randn(n, generator=generator, dtype=torch.float64))
    return torch.diag(diagonal) + (G * diagonal.sqrt()[:, None]) @ (G * diagonal.sqrt()[:, None]).T / 64


# -- Safe Delta --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SafeDeltaCase:
    name: str
    m: int
    n: int
    s_values: tuple[float, ...]
    from_activations: bool  # H from the runner's add_batch (else set directly)
    seed: int = 0

    def update_std(self) -> float:
        """An update whose loss per block is 25x the budget at s = 0.1, so the selection ends
        mid-way at s = 0.01 to 1 (the least sensitive entries, kept first, cost least)."""
        columns = min(2048, self.n)
        return (0.1 / (2 * 4096 * columns * 0.04)) ** 0.5


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    return layer


def _published_gram(runner_cls: type, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The runner's own H from ``add_batch``, one sequence of ``SEQUENCE_TOKENS`` at a time."""
    runner = runner_cls(_linear(W), _linear(W))
    for start in range(0, x.shape[0], SEQUENCE_TOKENS):
        runner.add_batch(x[start : start + SEQUENCE_TOKENS].unsqueeze(0), None)
    return runner.H


def safedelta_rows(runner_cls: type, case: SafeDeltaCase) -> list[dict]:
    g = torch.Generator().manual_seed(case.seed)
    # float32, not bfloat16: an update of ~1e-4 on weights of ~0.02 would be rounded to whole ulps
    W_aligned = torch.randn(case.m, case.n, generator=g) * 0.02
    W_ft = W_aligned + torch.randn(case.m, case.n, generator=g) * case.update_std()
    if case.from_activations:
        x = activations(8 * SEQUENCE_TOKENS, case.n, g)
        H_published = _published_gram(runner_cls, W_aligned, x)
        H_ours = normalised_gram(x.double().T @ x.double(), x.shape[0])  # csulora calibrate's S_h
    else:
        H_ours = spiked_gram(case.n, g)
        H_ours /= H_ours.diagonal().mean()
        H_published = (H_ours * 37.0).float()  # another scale on purpose: it must not matter
    start = time.perf_counter()
    factor = safety_factor(H_ours)
    factor_seconds = time.perf_counter() - start
    del H_ours
    rows = []
    for s in case.s_values:
        ours = W_ft - W_aligned
        start = time.perf_counter()
        safe_delta_(ours, factor, s)
        ours_seconds = factor_seconds + time.perf_counter() - start
        as_published = None
        for stable in (False, True):
            theirs, seconds = _published_safedelta(runner_cls, W_aligned, W_ft, H_published, s, stable)
            row = {"case": case.name, "shape": [case.m, case.n], "s": s, "published_ties": "stable" if stable else "as published"}
            row.update(compare_updates(ours, theirs, ours == W_ft - W_aligned, theirs == W_ft - W_aligned, "kept"))
            if as_published is None:
                as_published = theirs
            else:  # how far the published result moves with nothing but its sort's tie order
                moved = float((theirs - as_published).norm() / as_published.norm())
                row["rel_diff_published_stable_vs_as_published"] = moved
            # ours: the factor (float64, once per Gram) and the sweep; the published call does both
            row.update(seconds_published=round(seconds, 2), seconds_csulora=round(ours_seconds, 2),
                       seconds_csulora_factor=round(factor_seconds, 2))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _published_safedelta(runner_cls: type, W_aligned, W_ft, H, s: float, stable: bool) -> tuple[torch.Tensor, float]:
    runner = runner_cls(_linear(W_aligned), _linear(W_ft))
    runner.H = H.clone()
    start = time.perf_counter()
    with _patched_torch(stable_argsort=stable), torch.no_grad():
        runner.adjust_delta(s, percdamp=0.01, blocksize=2048)  # as run_safedelta.py calls it
    seconds = time.perf_counter() - start
    return runner.align_layer.weight.data - W_aligned, seconds


# -- Antidote ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AntidoteCase:
    name: str
    m: int
    n: int
    ratios: tuple[float, ...]
    rank: int | None  # None: a full fine-tune's weights; else the LoRA rank
    projections: tuple[str, ...] = ("q_proj",)
    tokens: int = 8 * SEQUENCE_TOKENS
    seed: int = 1


class _LoraFactors(nn.Module):
    """A LoRA update with PEFT's parameter names (``lora_A.default``, ``lora_B.default``)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({"default": _linear(A)})
        self.lora_B = nn.ModuleDict({"default": _linear(B)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B["default"](self.lora_A["default"](x))


class _DecoderLayer(nn.Module):
    def __init__(self, projections: dict[str, nn.Module]) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name, module in projections.items():
            setattr(self.self_attn, name, module)

    def forward(self, hidden: torch.Tensor, attention_mask=None, position_ids=None, **kwargs: Any) -> tuple:
        for module in self.self_attn.children():
            module(hidden)  # the published hooks record each pruned linear's inputs
        return (hidden,)


class StandInModel(nn.Module):
    """What ``prune_wanda_outlier`` reads of a model: ``layers`` (``model.layers`` too), ``config``,
    and a forward that hands layer 0 its inputs with attention mask and position ids."""

    def __init__(self, table: torch.Tensor, layer: nn.Module) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.layers = nn.ModuleList([layer])
        self.config = types.SimpleNamespace(use_cache=False)

    @property
    def model(self) -> StandInModel:  # the adapter path reads model.model.layers
        return self

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        batch, length = input_ids.shape
        return self.layers[0](self.table[input_ids], attention_mask=torch.ones(batch, length),
                              position_ids=torch.arange(length).unsqueeze(0))


def _published_masks(prune: Callable[..., dict], layer: nn.Module, x: torch.Tensor, ratio: float, full: bool) -> tuple[dict, float]:
    model = StandInModel(x, layer)
    ids = torch.arange(x.shape[0]).reshape(-1, SEQUENCE_TOKENS)
    loader = [{"input_ids": ids[i : i + 2]} for i in range(0, ids.shape[0], 2)]  # batches of 2 sequences
    args = types.SimpleNamespace(dense_ratio=ratio, sample_num=len(ids), full_finetuning="True" if full else "False",
                                 model="stand-in")  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # it prints every module it prunes
        masks = prune(args, model, loader, device=torch.device("cpu"))
    return masks, time.perf_counter() - start


def antidote_rows(prune: Callable[..., dict], case: AntidoteCase) -> list[dict]:
    g = torch.Generator().manual_seed(case.seed)
    x = activations(case.tokens, case.n, g)
    rows = []
    for ratio in case.ratios:
        compare = _antidote_full if case.rank is None else _antidote_lora
        for row in compare(prune, case, x, ratio, torch.Generator().manual_seed(case.seed + 1)):
            row = {"case": case.name, "dense_ratio": ratio, **row}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _antidote_full(prune, case: AntidoteCase, x, ratio, g) -> list[dict]:
    aligned = {p: _bf16_randn(case.m, case.n, generator=g, std=0.02) for p in case.projections}
    tuned = {p: (w + 0.1 * _bf16_randn(case.m, case.n, generator=g, std=0.02)).bfloat16().float() for p, w in aligned.items()}
    masks, seconds = _published_masks(prune, _DecoderLayer({p: _linear(w) for p, w in tuned.items()}), x, ratio, True)
    start = time.perf_counter()
    q = x.double().square().sum(0)
    q /= q.mean()  # the diagonal of the normalised Gram, as csulora calibrate would store it
    statistics_seconds = time.perf_counter() - start
    rows = []
    for p in case.projections:
        theirs = tuned[p] * (1 - masks[f"model.layers.0.self_attn.{p}.weight"]) - aligned[p]
        ours = tuned[p] - aligned[p]
        start = time.perf_counter()
        antidote_dense_(ours, aligned[p], q, ratio)
        ours_seconds = time.perf_counter() - start
        nonzero = tuned[p] != 0  # bfloat16 sums cancel to exact zeros now and then: not pruned
        row = {"module": p, "shape": [case.m, case.n], "kind": "full fine-tune"}
        row.update(compare_updates(ours, theirs, ((aligned[p] + ours) == 0) & nonzero, ((aligned[p] + theirs) == 0) & nonzero,
                                   "pruned"))  # fmt: skip
        rows.append({**row, **_seconds(seconds, ours_seconds, statistics_seconds)})
    return rows


def _seconds(published: float, ours: float, ours_statistics: float) -> dict:
    """Wall seconds. The published pruning includes its statistics pass (forwards through the
    stand-in layer); ours is timed apart from forming its statistics from the activations."""
    return {"seconds_published": round(published, 2), "seconds_csulora": round(ours, 2),
            "seconds_csulora_statistics": round(ours_statistics, 2)}  # fmt: skip


def _antidote_lora(prune, case: AntidoteCase, x, ratio, g) -> list[dict]:
    r = case.rank
    factors = {p: (_bf16_randn(r, case.n, generator=g, std=0.02), _bf16_randn(case.m, r, generator=g, std=0.02))
               for p in case.projections}  # fmt: skip
    layer = _DecoderLayer({p: _LoraFactors(A, B) for p, (A, B) in factors.items()})
    masks, seconds = _published_masks(prune, layer, x, ratio, False)
    start = time.perf_counter()
    x64 = x.double()
    inputs = SecondMoment(n=case.n, matrix=normalised_gram(x64.T @ x64, x.shape[0]))
    gram_seconds = time.perf_counter() - start
    rows = []
    for p, (A, B) in factors.items():
        start = time.perf_counter()
        ours = antidote_factors(A, B, inputs, ratio)
        ours_seconds = time.perf_counter() - start
        prefix = f"base_model.model.model.layers.0.self_attn.{p}"
        for factor, before, after in (("lora_A", A, ours.A), ("lora_B", B, ours.B)):
            theirs = before * (1 - masks[f"{prefix}.{factor}.default.weight"])
            row = {"module": f"{p}.{factor}", "shape": list(before.shape), "kind": f"adapter, rank {r}"}
            row.update(compare_updates(after.float(), theirs, (after == 0) & (before != 0), (theirs == 0) & (before != 0), "pruned"))
            rows.append({**row, **_seconds(seconds, ours_seconds, gram_seconds)})
    return rows


# -- comparison --------------------------------------------------------------------------------------
def compare_updates(ours: torch.Tensor, theirs: torch.Tensor, ours_marked: torch.Tensor, theirs_marked: torch.Tensor,
                    what: str) -> dict:  # fmt: skip
    """Differences of two corrected updates and the agreement of the entries each side marked."""
    diff = (ours.double() - theirs.double())
    both = int((ours_marked & theirs_marked).sum())
    either = int((ours_marked | theirs_marked).sum())
    scale = float(theirs.double().norm())
    return {
        "max_abs_diff": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_diff": float(diff.norm()) / scale if scale > 0 else float(diff.norm()),
        "max_abs_update": float(theirs.abs().max()) if theirs.numel() else 0.0,
        f"{what}_csulora": int(ours_marked.sum()),
        f"{what}_published": int(theirs_marked.sum()),
        f"{what}_agreement": both / either if either else 1.0,
        f"{what}_differing": either - both,
        "entries": int(ours.numel()),
    }


# -- the shapes --------------------------------------------------------------------------------------
SHAPES: dict[str, tuple[list[SafeDeltaCase], list[AntidoteCase]]] = {
    "toy": (
        [SafeDeltaCase("toy", 6, 10, (0.1, 10.0), from_activations=True)],
        [AntidoteCase("toy full", 5, 12, (0.2,), None, ("q_proj", "k_proj"), tokens=2 * SEQUENCE_TOKENS),
         AntidoteCase("toy adapter", 5, 12, (0.2,), 3, tokens=2 * SEQUENCE_TOKENS)],
    ),
    "small": (
        [SafeDeltaCase("small (two blocks)", 128, 2560, (0.01, 0.1, 1.0), from_activations=True)],
        [AntidoteCase("small full (q, k, v)", 64, 96, (1e-5, 0.1), None, ("q_proj", "k_proj", "v_proj")),
         AntidoteCase("small adapter (q, k, v)", 64, 96, (0.1,), 8, ("q_proj", "k_proj", "v_proj"))],
    ),
    "7b": (
        [SafeDeltaCase("7B q_proj", 4096, 4096, (0.1,), from_activations=False),
         SafeDeltaCase("7B gate_proj", 11008, 4096, (0.1,), from_activations=False),
         SafeDeltaCase("7B down_proj", 4096, 11008, (0.1,), from_activations=False)],
        [AntidoteCase("7B full q_proj", 4096, 4096, (1e-5, 0.1), None, tokens=16 * SEQUENCE_TOKENS),
         AntidoteCase("7B adapter down_proj", 4096, 11008, (0.1,), 64, ("down_proj",), tokens=16 * SEQUENCE_TOKENS)],
    ),
}


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def markdown_table(report: dict) -> str:
    """The docs' tables (docs/peers.md) from a result file: one row per setting and module."""
    lines = ["| Safe Delta case | m x n | s | published ties | kept (ours) | kept (published) | agreement | "
             "entries differing | max abs diff | rel diff | published: stable vs as is | max abs X | s published / ours (factor) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["safedelta"]:
        lines.append(
            f"| {r['case']} | {r['shape'][0]} x {r['shape'][1]} | {r['s']} | {r['published_ties']} | {r['kept_csulora']} | "
            f"{r['kept_published']} | {r['kept_agreement']:.6f} | {r['kept_differing']} | {r['max_abs_diff']:.2e} | "
            f"{r['rel_diff']:.2e} | {_optional(r.get('rel_diff_published_stable_vs_as_published'))} | "
            f"{r['max_abs_update']:.2e} | {r['seconds_published']} / {r['seconds_csulora']} "
            f"({r['seconds_csulora_factor']}) |"
        )
    lines += ["", "| Antidote case | module | shape | dense_ratio | pruned (ours) | pruned (published) | agreement | "
              "max abs diff | s published / ours (+ statistics) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["antidote"]:
        lines.append(
            f"| {r['case']} | {r['module']} | {r['shape'][0]} x {r['shape'][1]} | {r['dense_ratio']} | {r['pruned_csulora']} | "
            f"{r['pruned_published']} | {r['pruned_agreement']:.6f} | {r['max_abs_diff']:.2e} | "
            f"{r['seconds_published']} / {r['seconds_csulora']} (+{r['seconds_csulora_statistics']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--safedelta", type=Path, help="checkout of github.com/ColinLu50/SafeDelta")
    parser.add_argument("--antidote", type=Path, help="checkout of github.com/git-disl/Antidote")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["small", "7b"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_parity.json"))
    parser.add_argument("--table", type=Path, help="only print the markdown tables of this result file")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.safedelta is None or args.antidote is None:
        parser.error("--safedelta and --antidote are required (or --table FILE)")
    runner_cls, prune = load_safedelta(args.safedelta), load_antidote(args.antidote)
    report: dict[str, Any] = {"safedelta": [], "antidote": []}
    for shape in args.shapes:
        safedelta_cases, antidote_cases = SHAPES[shape]
        for case in safedelta_cases:
            report["safedelta"] += safedelta_rows(runner_cls, case)
        for case in antidote_cases:
            report["antidote"] += antidote_rows(prune, case)
    report.update(
        published={"safedelta": "github.com/ColinLu50/SafeDelta llama2/safedelta/safedelta_runner.py SafeDeltaRunner.adjust_delta",
                   "antidote": "github.com/git-disl/Antidote utils.py prune_wanda_outlier"},
        command="python -m benchmarks.peers_parity " + " ".join(argv if argv is not None else sys.argv[1:]),
        torch=torch.__version__, threads=torch.get_num_threads(),
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
