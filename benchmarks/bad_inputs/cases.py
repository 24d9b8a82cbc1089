"""Every case the runner drives: per command, at least one per error class, and issue 23's cases.

A case is a command line with placeholders: the inputs of :func:`benchmarks.bad_inputs.inputs.build_inputs`
(``{aligned}``, ``{cal_flip}``, ...) and, per case, ``{out}`` (its output path, in a folder of its
own), ``{outs}`` (that folder) and ``{blocker}`` (a plain file there: an output "inside" it has a
parent that is a file). ``kind`` says what must happen:

- ``refuse``: exit 2, one error line last on stderr, no traceback, no input byte changed,
  nothing written (an ``existing`` output left as it was);
- ``interrupt``: SIGINT/SIGTERM once the command is running: exit 130/143, one line, nothing
  left behind (whole processes only);
- ``succeed``: exit 0, plus the case's ``stderr_lacks``;
- ``rerun``: run twice (the second with ``--force``): every output file byte-identical;
- ``help``: ``--help`` (exit 0) says each of ``help_has``.

``owner``/``reason``: an expected failure whose fix belongs to that package; the runner
reports it apart, and as an unexpected pass once it passes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ERROR_CLASSES = (
    "missing", "empty", "corrupt", "wrong kind", "wrong model", "NaN", "out-of-range knob", "existing output",
    "output onto or inside an input", "unwritable output", "interrupt",
)  # fmt: skip
COMMANDS = ("subspace", "audit", "correct", "calibrate", "tune", "eval", "train", "demo")
# Error classes that do not apply to a command, and why (the coverage table says so).
NOT_APPLICABLE = {
    ("demo", c): "the demo takes no input file, model or knob: it builds (or reuses) the tiny world itself"
    for c in ("missing", "empty", "corrupt", "wrong kind", "wrong model", "NaN", "out-of-range knob")
}
PIPELINE = "pipeline"  # src/csulora/pipeline/ (correct, audit: the lead's rewrite)
TUNING = "tuning"  # src/csulora/tuning/ and cli/tuning.py
CALIBRATE = "calibrate"  # src/csulora/references/calibration.py
REFERENCES = "references"  # src/csulora/references/subspace.py
# An output that is an input, without --force: the advice must be "choose another path", never "use --force".
ADVICE = "checks 'exists (use --force)' before the output rule, so it advises --force for an input"
POWER = ("--algorithm", "randomized", "--rank", "4", "--power-iterations", "200000", "--power-tolerance", "0")


@dataclass(frozen=True)
class Case:
    id: str
    command: str
    error_class: str  # one of ERROR_CLASSES, or "issue 23: ..."
    argv: tuple[str, ...]
    kind: str = "refuse"
    match: str | None = None  # regex the error line must match
    owner: str | None = None
    reason: str | None = None
    fast: bool = True  # in the in-process subset (make test)
    existing: str | None = None  # "dir" / "file": {out} exists (non-empty) before the run
    signal: int | None = None
    stderr_lacks: tuple[str, ...] = ()
    help_has: tuple[str, ...] = ()
    max_chars: int | None = None  # the error line's length, at most
    env: dict[str, str] = field(default_factory=dict)
    inspect: Callable[[Path, str], list[str]] | None = None  # succeed: (OUTDIR, stderr) -> problems

    @property
    def expected_exit(self) -> int:
        if self.kind == "interrupt":
            return 130 if self.signal == signal.SIGINT else 143
        return 2 if self.kind == "refuse" else 0

    @property
    def accepted_exits(self) -> tuple[int, ...]:
        """``expected_exit``, and for SIGINT also death by SIGINT (``-2``; a shell shows 130 for both).

        CPython quirk: a KeyboardInterrupt raised inside code run by ``exec(string)`` (a dataclass
        being defined during one of transformers' lazy imports) marks itself "unhandled" even when
        ``csulora.cli.main`` catches it, and ``python -m`` then exits by re-raising SIGINT after
        the one-line message and the cleanup (seen now and then with ``eval``, depending on where
        the signal lands). A script file -- the installed ``csulora`` entry point -- exits through
        another path and keeps 130.
        """
        if self.kind == "interrupt" and self.signal == signal.SIGINT:
            return (130, -int(signal.SIGINT))
        return (self.expected_exit,)


def _cases(command: str, base: tuple[str, ...], rows: list[tuple], **common) -> list[Case]:
    """Cases of one command: each row is (name, error class, argv tail or a full argv, options)."""
    out = []
    for row in rows:
        name, error_class, argv, options = (*row, {})[:4]
        full = argv if argv[:1] == (command,) else (*base, *argv)
        out.append(Case(id=f"{command}/{name}", command=command, error_class=error_class, argv=full,
                        **{**common, **options}))  # fmt: skip
    return out


def _interrupts(command: str, argv: tuple[str, ...], **options) -> list[Case]:
    return [
        Case(id=f"{command}/interrupt {name}", command=command, error_class="interrupt", argv=argv, kind="interrupt",
             signal=signum, fast=False, **options)  # fmt: skip
        for name, signum in (("SIGINT", signal.SIGINT), ("SIGTERM", signal.SIGTERM))
    ]


def subspace_cases() -> list[Case]:
    base = ("subspace", "{base}", "{aligned}", "-o", "{out}")
    rows = [
        ("missing BASE", "missing", ("subspace", "{missing}", "{aligned}", "-o", "{out}")),
        ("empty BASE folder", "empty", ("subspace", "{empty_dir}", "{aligned}", "-o", "{out}")),
        ("corrupt ALIGNED", "corrupt", ("subspace", "{base}", "{aligned_corrupt}", "-o", "{out}")),
        ("adapter as BASE", "wrong kind", ("subspace", "{attacked}", "{aligned}", "-o", "{out}")),
        ("ALIGNED of another shape", "wrong model", ("subspace", "{base}", "{other}", "-o", "{out}")),
        ("NaN in ALIGNED", "NaN", ("subspace", "{base}", "{aligned_nan}", "-o", "{out}")),
        ("--energy 1.5", "out-of-range knob", ("--energy", "1.5")),
        ("existing output", "existing output", (), {"existing": "file", "match": "file exists"}),
        ("-o ALIGNED/model.safetensors --force", "output onto or inside an input",
         ("subspace", "{base}", "{aligned}", "-o", "{aligned}/model.safetensors", "--force"),
         {"match": "lies inside the input ALIGNED"}),
        ("-o inside ALIGNED", "output onto or inside an input",
         ("subspace", "{base}", "{aligned}", "-o", "{aligned}/sub.safetensors"), {"match": "lies inside the input"}),
        ("-o ALIGNED/model.safetensors", "output onto or inside an input",
         ("subspace", "{base}", "{aligned}", "-o", "{aligned}/model.safetensors"),
         {"match": "lies inside the input ALIGNED"}),
        ("-o under /proc", "unwritable output",
         ("subspace", "{base}", "{aligned}", "-o", "/proc/csulora-bad-inputs/sub.safetensors"), {"match": "cannot be written"}),
        ("-o through a file", "unwritable output",
         ("subspace", "{base}", "{aligned}", "-o", "{blocker}/sub.safetensors"), {"match": "is not a folder"}),
    ]
    return _cases("subspace", base, rows) + _interrupts("subspace", (*base, *POWER))


def audit_cases() -> list[Case]:
    base = ("audit", "{attacked}", "--subspace", "{sub}")
    rows = [
        ("missing ADAPTER", "missing", ("audit", "{missing}", "--subspace", "{sub}")),
        ("empty ADAPTER folder", "empty", ("audit", "{empty_dir}", "--subspace", "{sub}")),
        ("corrupt adapter weights", "corrupt", ("audit", "{adapter_corrupt}", "--subspace", "{sub}")),
        ("calibration file as --subspace", "wrong kind", ("audit", "{attacked}", "--subspace", "{cal}")),
        ("adapter against another model", "wrong model",
         ("audit", "{attacked}", "--base", "{other}", "--aligned", "{other}")),
        ("NaN in the adapter", "NaN", ("audit", "{adapter_nan}", "--subspace", "{sub}")),
        ("--energy 0", "out-of-range knob", ("audit", "{attacked}", "--base", "{base}", "--aligned", "{aligned}",
                                             "--energy", "0")),
        ("existing --json", "existing output", ("--json", "{out}"), {"existing": "file", "match": "file exists"}),
        ("--json onto the adapter's config --force", "output onto or inside an input",
         ("--json", "{attacked}/adapter_config.json", "--force"), {"match": "lies inside the input ADAPTER"}),
        ("--json inside the adapter", "output onto or inside an input", ("--json", "{attacked}/audit.json"),
         {"match": "lies inside the input ADAPTER"}),
        ("--json under /proc", "unwritable output", ("--json", "/proc/csulora-bad-inputs/audit.json"),
         {"match": "cannot be written"}),
    ]
    interrupts = _interrupts("audit", ("audit", "{attacked}", "--base", "{base}", "--aligned", "{aligned}", *POWER,
                                       "--json", "{out}"))  # fmt: skip
    return _cases("audit", base, rows) + interrupts


def correct_cases() -> list[Case]:
    base = ("correct", "{attacked}", "-o", "{out}", "--method", "scale", "--factor", "0.5")
    calibrated = ("correct", "{attacked}", "-o", "{out}", "--method", "calibrated")
    ft = ("correct", "{ft}", "--aligned", "{aligned}", "--method", "scale", "--factor", "0.5")
    rows = [
        ("missing ADAPTER", "missing", ("correct", "{missing}", *base[2:])),
        ("empty ADAPTER folder", "empty", ("correct", "{empty_dir}", *base[2:])),
        ("corrupt adapter weights", "corrupt", ("correct", "{adapter_corrupt}", *base[2:])),
        ("truncated calibration", "corrupt", (*calibrated, "--calibration", "{cal_truncated}")),
        ("subspace cache as --calibration", "wrong kind", (*calibrated, "--calibration", "{sub}")),
        ("pickle as --calibration", "wrong kind", (*calibrated, "--calibration", "{pickle}")),
        ("checkpoint against another model", "wrong model", ("correct", "{ft}", "-o", "{out}", "--aligned", "{other}",
                                                             "--method", "scale", "--factor", "0.5")),
        ("calibration of BASE for an adapter of ALIGNED", "wrong model", (*calibrated, "--calibration", "{cal_base}"),
         {"match": "another model"}),
        ("NaN in the adapter", "NaN", ("correct", "{adapter_nan}", *base[2:])),
        ("--gamma -1", "out-of-range knob", ("correct", "{attacked}", "-o", "{out}", "--method", "csulora",
                                             "--subspace", "{sub}", "--gamma", "-1")),
        ("--factor 2", "out-of-range knob", ("correct", "{attacked}", "-o", "{out}", "--method", "scale",
                                             "--factor", "2")),
        ("existing OUTDIR", "existing output", (), {"existing": "dir", "match": "not empty"}),
        ("-o ADAPTER --force", "output onto or inside an input", ("correct", "{attacked}", "-o", "{attacked}",
                                                                  *base[4:], "--force"), {"match": " is the input"}),
        ("-o ADAPTER", "output onto or inside an input", ("correct", "{attacked}", "-o", "{attacked}", *base[4:]),
         {"match": " is the input"}),
        ("-o ADAPTER/fixed", "output onto or inside an input", ("correct", "{attacked}", "-o", "{attacked}/fixed",
                                                                *base[4:]), {"match": "lies inside the input"}),
        ("-o the world folder --force", "output onto or inside an input",
         ("correct", "{attacked}", "-o", "{world}", *base[4:], "--force"), {"match": "contains the input"}),
        ("--report onto the adapter's config --force", "output onto or inside an input",
         (*base, "--report", "{attacked}/adapter_config.json", "--force"), {"match": "the input"}),
        ("FT -o ALIGNED --force", "output onto or inside an input", (*ft, "-o", "{aligned}", "--force"),
         {"match": " is the input"}),
        ("FT -o FT/fixed", "output onto or inside an input", (*ft, "-o", "{ft}/fixed"), {"match": "lies inside"}),
        ("-o under /proc", "unwritable output", ("correct", "{attacked}", "-o", "/proc/csulora-bad-inputs/fixed",
                                                 *base[4:]), {"match": "cannot be written"}),
        ("-o through a file", "unwritable output", ("correct", "{attacked}", "-o", "{blocker}/fixed", *base[4:]),
         {"match": "is not a folder"}),
        ("sign-flipped Gram", "issue 23: statistics not PSD", (*calibrated, "--calibration", "{cal_flip}"),
         {"match": "is not positive semi-definite"}),
        ("corrupt calibration header", "issue 23: corrupt header", (*calibrated, "--calibration", "{cal_corrupt}"),
         {"match": "not a csulora calibration file", "max_chars": 400}),
    ]
    return _cases("correct", base, rows) + _correct_successes() + _interrupts(
        "correct", ("correct", "{attacked}", "-o", "{out}", "--method", "csulora", "--base", "{base}",
                    "--aligned", "{aligned}", *POWER))  # fmt: skip


def _correct_successes() -> list[Case]:
    alone = Case(
        id="correct/calibrated with --aligned alone", command="correct", error_class="issue 23: calibration's model",
        argv=("correct", "{attacked}", "-o", "{out}", "--method", "calibrated", "--calibration", "{cal}", "--aligned",
              "{aligned}"),
        kind="succeed",
    )  # fmt: skip
    rerun = Case(
        id="correct/rerun --force is byte-identical", command="correct", error_class="issue 23: reruns",
        argv=("correct", "{attacked}", "-o", "{out}", "--method", "calibrated", "--calibration", "{cal}"), kind="rerun",
    )  # fmt: skip
    return [alone, rerun]


def calibrate_cases() -> list[Case]:
    base = ("calibrate", "{aligned}", "--task", "{task}", "--harmful", "{h}", "--max-new-tokens", "8", "-o", "{out}")
    tail = base[2:]
    slow = {"fast": False}
    rows = [
        ("missing ALIGNED", "missing", ("calibrate", "{missing}", *tail)),
        ("missing --task file", "missing", ("calibrate", "{aligned}", "--task", "{data}/none.jsonl", *tail[2:])),
        ("empty ALIGNED folder", "empty", ("calibrate", "{empty_dir}", *tail)),
        ("empty --task", "empty", ("calibrate", "{aligned}", "--task", "{empty_jsonl}", *tail[2:])),
        ("corrupt ALIGNED", "corrupt", ("calibrate", "{aligned_corrupt}", *tail)),
        ("corrupt --task", "corrupt", ("calibrate", "{aligned}", "--task", "{corrupt_jsonl}", *tail[2:])),
        ("adapter as ALIGNED", "wrong kind", ("calibrate", "{attacked}", *tail)),
        ("model without a tokenizer", "wrong model", ("calibrate", "{other_no_tokenizer}", *tail)),
        ("hub id, offline", "issue 23: hub ids", ("calibrate", "csulora-bad-inputs/no-such-model", *tail),
         {"match": "hub"}),
        ("NaN in ALIGNED", "NaN", ("calibrate", "{aligned_nan}", *tail), slow),
        ("--max-new-tokens 0", "out-of-range knob", (*base[:6], "--max-new-tokens", "0", "-o", "{out}")),
        ("--batch-size 0", "out-of-range knob", (*base, "--batch-size", "0")),
        ("existing output", "existing output", (), {"existing": "file", "match": "file exists"}),
        ("-o ALIGNED/model.safetensors --force", "output onto or inside an input",
         (*base[:-1], "{aligned}/model.safetensors", "--force"),
         {"fast": False}),
        ("-o inside ALIGNED", "output onto or inside an input", (*base[:-1], "{aligned}/calib.safetensors"),
         {"fast": False}),
        ("-o under /proc", "unwritable output", (*base[:-1], "/proc/csulora-bad-inputs/calib.safetensors"),
         {"match": "cannot be written"}),
    ]
    rerun = Case(id="calibrate/rerun --force is byte-identical", command="calibrate", error_class="issue 23: reruns",
                 argv=base, kind="rerun", fast=False)  # fmt: skip
    return _cases("calibrate", base, rows) + [rerun] + _interrupts("calibrate", base)


def tune_cases() -> list[Case]:
    # Small data: a run that is not refused ends in seconds (and scale's factor 1 qualifies on it).
    data = ("--harmful", "{h}", "--benign", "{b}", "--task", "{task}", "--max-new-tokens", "8")
    base = ("tune", "{attacked}", "--aligned", "{aligned}", "-o", "{out}", "--method", "scale", "--grid", "1,0.5", *data)
    calibrated = ("tune", "{attacked}", "--aligned", "{aligned}", "-o", "{out}", "--method", "calibrated", "--grid",
                  "0,10", *data)  # fmt: skip
    rest = base[2:]
    apart = {"fast": False}
    rows = [
        ("missing ADAPTER", "missing", ("tune", "{missing}", *rest)),
        ("empty ADAPTER folder", "empty", ("tune", "{empty_dir}", *rest)),
        ("corrupt adapter weights", "corrupt", ("tune", "{adapter_corrupt}", *rest), {"fast": False}),
        ("subspace cache as --calibration", "wrong kind", (*calibrated, "--calibration", "{sub}")),
        ("calibration of BASE", "wrong model", (*calibrated, "--calibration", "{cal_base}"),
         {"match": "another model", "fast": False}),
        ("NaN in the adapter", "NaN", ("tune", "{adapter_nan}", *rest), {"fast": False}),
        ("--max-asr-gap -1", "out-of-range knob", (*base, "--max-asr-gap", "-1")),
        ("existing OUTDIR", "existing output", (), {"existing": "dir", "match": "not empty"}),
        ("-o ADAPTER --force", "output onto or inside an input",
         ("tune", "{attacked}", "--aligned", "{aligned}", "-o", "{attacked}", *base[6:], "--force"), apart),
        ("-o ADAPTER/fixed", "output onto or inside an input",
         ("tune", "{attacked}", "--aligned", "{aligned}", "-o", "{attacked}/fixed", *base[6:]),
         {**apart, "match": r"-o/--output \S*/attacked/fixed lies inside the input"}),
        ("-o under /proc", "unwritable output",
         ("tune", "{attacked}", "--aligned", "{aligned}", "-o", "/proc/csulora-bad-inputs/t", *base[6:]),
         {"match": "cannot be written"}),
        ("--harmful advbench:test", "issue 23: held-out data", (*base, "--harmful", "advbench:test"),
         {"match": "test split"}),
        ("calibrated without statistics names --calibration-task", "issue 23: newcomer", calibrated,
         {"match": "--calibration-task"}),
        ("--task is the calibration's own data", "issue 23: validation is training data",
         ("tune", "{attacked}", "--aligned", "{aligned}", "-o", "{out}", "--method", "calibrated", "--grid", "0,10",
          "--harmful", "{h}", "--benign", "{b}", "--task", "{task}", "--max-new-tokens", "8", "--calibration",
          "{cal_real}"),
         {"fast": False}),
    ]
    return _cases("tune", base, rows) + _tune_runs(base) + _interrupts("tune", base)


def _tune_runs(base: tuple[str, ...]) -> list[Case]:
    quiet = Case(
        id="tune/no library FutureWarning", command="tune", error_class="issue 23: newcomer", argv=base,
        kind="succeed", fast=False, stderr_lacks=("FutureWarning",),
    )  # fmt: skip
    rerun = Case(
        id="tune/rerun --force is byte-identical", command="tune", error_class="issue 23: reruns", argv=base,
        kind="rerun", fast=False,
    )  # fmt: skip
    return [quiet, rerun, *_calibration_task_runs(base)]


def _calibration_task_runs(base: tuple[str, ...]) -> list[Case]:
    """``tune --calibration-task``: what it writes about the statistics it computed (issue 23)."""
    argv = (*base[:6], "--method", "calibrated", "--grid", "0,10", *base[10:], "--calibration-task", "{task_val}")
    common = {"command": "tune", "argv": argv, "kind": "succeed", "fast": False}
    return [
        Case(id="tune/--calibration-task: card and stderr name no temporary path", error_class="issue 23: reruns",
             inspect=_no_temporary_path, **common),
        Case(id="tune/--calibration-task: calibrate's generation default, recorded", error_class="issue 23: one path",
             inspect=_calibrate_default_tokens, **common),
        Case(id="tune/--calibration-task: the card's calibration row is readable", error_class="issue 23: newcomer",
             inspect=_readable_calibration_row, **common),
    ]  # fmt: skip


def _no_temporary_path(out: Path, stderr: str) -> list[str]:
    said = [line for line in [*(out / "README.md").read_text().splitlines(), *stderr.splitlines()] if ".tmp-" in line]
    return [f"a temporary path is named: {said[0][:200]}"] if said else []


def _calibrate_default_tokens(out: Path, stderr: str) -> list[str]:
    from csulora.eval.generation import DEFAULT_MAX_NEW_TOKENS
    from csulora.io.calibration_file import load_calibration

    tokens = load_calibration(out / "calibration.safetensors").info.get("generation", {}).get("max_new_tokens")
    return [] if tokens == DEFAULT_MAX_NEW_TOKENS else [f"statistics made with {tokens} new tokens, not {DEFAULT_MAX_NEW_TOKENS}"]


def _readable_calibration_row(out: Path, stderr: str) -> list[str]:
    rows = [line for line in (out / "README.md").read_text().splitlines() if line.startswith("| calibration |")]
    if len(rows) != 1:
        return [f"{len(rows)} calibration rows in README.md"]
    blob = any(opening in rows[0] for opening in ('{"', "{'"))  # a dict dumped as JSON or Python
    return [f"a JSON blob in the card: {rows[0][:200]}"] if blob else []


def eval_cases() -> list[Case]:
    base = ("eval", "{aligned}", "--adapter", "{attacked}", "--harmful", "{h}", "--benign", "{b}",
            "--max-new-tokens", "4", "-o", "{out}")  # fmt: skip
    after_model = base[2:]
    rows = [
        ("missing MODEL", "missing", ("eval", "{missing}", *after_model)),
        ("empty MODEL folder", "empty", ("eval", "{empty_dir}", *after_model)),
        ("empty --harmful file", "empty", (*base, "--harmful", "{empty_txt}")),
        ("corrupt MODEL weights", "corrupt", ("eval", "{aligned_corrupt}", *after_model)),
        ("corrupt --task", "corrupt", (*base, "--task", "{corrupt_jsonl}")),
        ("adapter as MODEL", "wrong kind", ("eval", "{attacked}", *after_model)),
        ("adapter of another model", "wrong model", ("eval", "{other}", *after_model)),
        ("NaN in the adapter", "NaN", ("eval", "{aligned}", "--adapter", "{adapter_nan}", *base[4:])),
        ("--batch-size 0", "out-of-range knob", (*base, "--batch-size", "0")),
        ("existing OUTDIR", "existing output", (), {"existing": "dir", "match": "not empty"}),
        ("--out existing OUTDIR (the old flag name)", "existing output", base[:-2] + ("--out", "{out}"),
         {"existing": "dir", "match": "not empty"}),
        ("-o ADAPTER --force", "output onto or inside an input", (*base[:-1], "{attacked}", "--force"),
         {"match": " is the input --adapter"}),
        ("-o ADAPTER", "output onto or inside an input", (*base[:-1], "{attacked}"), {"match": " is the input --adapter"}),
        ("-o inside MODEL", "output onto or inside an input", (*base[:-1], "{aligned}/eval"),
         {"match": "lies inside the input MODEL"}),
        ("-o the prompts' folder --force", "output onto or inside an input", (*base[:-1], "{data}", "--force"),
         {"match": "contains the input --harmful"}),
        ("-o under /proc", "unwritable output", (*base[:-1], "/proc/csulora-bad-inputs/eval"),
         {"match": "cannot be written"}),
        ("-o through a file", "unwritable output", (*base[:-1], "{blocker}/eval"), {"match": "is not a folder"}),
    ]
    quiet = Case(id="eval/no library FutureWarning", command="eval", error_class="issue 23: newcomer", argv=base,
                 kind="succeed", fast=False, stderr_lacks=("FutureWarning",))  # fmt: skip
    return _cases("eval", base, rows) + [quiet] + _interrupts("eval", base)


def train_cases() -> list[Case]:
    base = ("train", "{aligned}", "--data", "{task}", "--method", "lora", "--steps", "1", "--batch-size", "1",
            "--rank", "2", "--targets", "q_proj", "-o", "{out}")  # fmt: skip
    after_model = base[2:]
    rows = [
        ("missing --data", "missing", (*base, "--data", "{data}/none.jsonl")),
        ("missing MODEL", "missing", ("train", "{missing}", *after_model)),
        ("empty --data", "empty", (*base, "--data", "{empty_jsonl}")),
        ("corrupt --data", "corrupt", (*base, "--data", "{corrupt_jsonl}")),
        ("adapter as MODEL", "wrong kind", ("train", "{attacked}", *after_model)),
        ("model without a tokenizer", "wrong model", ("train", "{other_no_tokenizer}", *after_model)),
        ("NaN in MODEL", "NaN", ("train", "{aligned_nan}", *after_model)),
        ("--steps 0", "out-of-range knob", (*base, "--steps", "0")),
        ("--rank 0", "out-of-range knob", (*base, "--rank", "0")),
        ("existing OUTDIR", "existing output", (), {"existing": "dir", "match": "not empty"}),
        ("--out existing OUTDIR (the old flag name)", "existing output", base[:-2] + ("--out", "{out}"),
         {"existing": "dir", "match": "not empty"}),
        ("-o MODEL --force", "output onto or inside an input", (*base[:-1], "{aligned}", "--force"),
         {"match": " is the input MODEL"}),
        ("-o MODEL", "output onto or inside an input", (*base[:-1], "{aligned}"), {"match": " is the input MODEL"}),
        ("-o inside MODEL", "output onto or inside an input", (*base[:-1], "{aligned}/lora"),
         {"match": "lies inside the input MODEL"}),
        ("-o the data's folder --force", "output onto or inside an input", (*base[:-1], "{data}", "--force"),
         {"match": "contains the input --data"}),
        ("-o under /proc", "unwritable output", (*base[:-1], "/proc/csulora-bad-inputs/lora"),
         {"match": "cannot be written"}),
    ]
    return _cases("train", base, rows) + _interrupts("train", (*base[:6], "--steps", "100000", *base[8:]))


def demo_cases() -> list[Case]:
    env = {"CSULORA_CACHE": "{cache}"}
    rows = [
        ("existing OUTDIR", "existing output", ("demo", "-o", "{out}"), {"existing": "dir", "match": "not empty"}),
        ("--out existing OUTDIR (the old flag name)", "existing output", ("demo", "--out", "{out}"),
         {"existing": "dir", "match": "not empty"}),
        ("-o $CSULORA_CACHE --force", "output onto or inside an input", ("demo", "-o", "{cache}", "--force"),
         {"match": "contains the input the demo world"}),
        ("-o under /proc", "unwritable output", ("demo", "-o", "/proc/csulora-bad-inputs/demo"),
         {"match": "cannot be written"}),
    ]
    return _cases("demo", ("demo",), rows, env=env) + _interrupts("demo", ("demo", "-o", "{out}"), env=env)


def help_cases() -> list[Case]:
    """A newcomer's reading (issue 23): help that says what is true, one output flag name."""
    outputs = [
        Case(id=f"{c}/help names -o/--output", command=c, error_class="issue 23: newcomer", argv=(c,), kind="help",
             help_has=("-o", "--output"))  # fmt: skip
        for c in COMMANDS
        if c != "audit"  # audit writes only the --json / --plot files it is asked for
    ]
    return outputs + [
        Case(id="csulora/help names full checkpoints and calibrate", command="csulora", error_class="issue 23: newcomer",
             argv=(), kind="help", help_has=("fully fine-tuned checkpoint", "`calibrate`")),
        Case(id="correct/help: --targets refused by calibrated, --restore said once", command="correct",
             error_class="issue 23: newcomer", argv=("correct",), kind="help",
             help_has=("--method calibrated must correct every module", "csulora, calibrated: beta >= 0")),
        Case(id="eval/help: OUTDIR rule matches --force", command="eval", error_class="issue 23: newcomer",
             argv=("eval",), kind="help", help_has=("must not exist or be empty unless --force",)),
        Case(id="tune/help says it writes an adapter or a checkpoint", command="tune",
             error_class="issue 23: newcomer", argv=("tune",), kind="help", help_has=("the chosen corrected adapter or checkpoint",)),
    ]  # fmt: skip


def all_cases() -> list[Case]:
    cases = [
        *subspace_cases(), *audit_cases(), *correct_cases(), *calibrate_cases(), *tune_cases(), *eval_cases(),
        *train_cases(), *demo_cases(), *help_cases(),
    ]  # fmt: skip
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


def coverage(cases: list[Case]) -> dict[str, dict[str, list[str] | str]]:
    """Command -> error class -> the case ids covering it (or why the class does not apply)."""
    table: dict[str, dict[str, list[str] | str]] = {}
    for command in COMMANDS:
        row: dict[str, list[str] | str] = {}
        for error_class in ERROR_CLASSES:
            ids = [c.id for c in cases if c.command == command and c.error_class == error_class]
            row[error_class] = ids or NOT_APPLICABLE.get((command, error_class), [])
        table[command] = row
    return table
