"""Running one case and judging it: exit code, the one-line message, inputs untouched, nothing left.

A case runs as a whole process (``python -m csulora ...``) or, for the quick subset, in this
process through :func:`csulora.cli.main` (an exception escaping it is a traceback). Interrupts
always run as processes: the signal is sent once the process is working -- it has an input
file open or mapped, or its staging folder has appeared beside the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bad_inputs.cases import Case
from benchmarks.bad_inputs.inputs import restore

# The output's name per command: a file for these, a folder for the others.
FILE_OUTPUTS = {"subspace": "out.safetensors", "calibrate": "out.safetensors", "audit": "out.json"}
CASE_TIMEOUT_S = 600


@dataclass
class Outcome:
    exit: int | None
    stdout: str
    stderr: str
    seconds: float
    note: str | None = None  # a traceback escaped main, the process outran its signal, ...
    signalled_when: str | None = None  # interrupts: "staging" (its output was being written) or "input open"


def run_case(case: Case, paths: dict[str, str], root: Path, *, in_process: bool) -> dict:
    """Run ``case`` and return its record (expected, got, problems, status)."""
    folder = root / "outs" / re.sub(r"[^A-Za-z0-9._-]+", "_", case.id)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    values = {**paths, "outs": str(folder), "out": str(folder / FILE_OUTPUTS.get(case.command, "out")),
              "blocker": str(folder / "blocker.txt")}  # fmt: skip
    argv = [a.format(**values) for a in case.argv]
    env = {k: v.format(**values) for k, v in case.env.items()}
    _prepare(case, Path(values["out"]), folder, argv)
    inputs_before, folder_before = tree_digest(Path(paths["inputs"])), tree_digest(folder)
    outcome, problems = _execute(case, argv, env, folder, Path(paths["inputs"]), in_process)
    inputs_after = tree_digest(Path(paths["inputs"]))
    if inputs_after != inputs_before:
        changed = sorted(k for k in set(inputs_before) | set(inputs_after) if inputs_before.get(k) != inputs_after.get(k))
        problems.append(f"inputs changed: {changed[:5]}")
        restore(root)
    if case.kind in ("refuse", "interrupt") and tree_digest(folder) != folder_before:
        problems.append(f"something was written or left beside the output: {sorted(_names(folder))}")
    return _record(case, argv, outcome, problems, str(root))


def _prepare(case: Case, out: Path, folder: Path, argv: list[str]) -> None:
    if any(str(folder / "blocker.txt") in a for a in argv):
        (folder / "blocker.txt").write_text("a plain file where a folder is expected\n")
    if case.existing == "dir":
        out.mkdir()
        (out / "keep.txt").write_text("mine\n")
    elif case.existing == "file":
        out.write_text("mine\n")


def _execute(case: Case, argv: list[str], env: dict[str, str], folder: Path, inputs: Path,
             in_process: bool) -> tuple[Outcome, list[str]]:  # fmt: skip
    if case.kind == "interrupt":
        outcome = interrupt(argv, env, case.signal or signal.SIGINT, folder, inputs)
        return outcome, judge_refusal(case, outcome)
    if case.kind == "help":
        outcome = execute([*argv, "--help"], env, in_process)
        text = " ".join(outcome.stdout.split())
        missing = [h for h in case.help_has if h not in text]
        return outcome, _exit_problem(case, outcome) + ([f"help does not say {missing}"] if missing else [])
    if case.kind == "rerun":
        return rerun(case, argv, env, folder, in_process)
    outcome = execute(argv, env, in_process)
    if case.kind == "succeed":
        said = [s for s in case.stderr_lacks if s in outcome.stderr]
        problems = _exit_problem(case, outcome) + ([f"stderr says {said}"] if said else [])
        if case.inspect and not problems:
            problems += case.inspect(Path(argv[argv.index("-o") + 1]), outcome.stderr)
        return outcome, problems
    return outcome, judge_refusal(case, outcome)


def execute(argv: list[str], env: dict[str, str], in_process: bool) -> Outcome:
    return _in_process(argv, env) if in_process else _process(argv, env)


def _in_process(argv: list[str], env: dict[str, str]) -> Outcome:
    from csulora.cli import main

    out, err, note = io.StringIO(), io.StringIO(), None
    started = time.perf_counter()
    with _environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # --help, argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            code, note = None, "traceback: " + traceback.format_exc().strip().splitlines()[-1]
    return Outcome(code, out.getvalue(), err.getvalue(), time.perf_counter() - started, note)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _process_env(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}


def _process(argv: list[str], env: dict[str, str]) -> Outcome:
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "csulora", *argv], capture_output=True, text=True,
                              env=_process_env(env), timeout=CASE_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        return Outcome(None, str(exc.stdout or ""), str(exc.stderr or ""), CASE_TIMEOUT_S, "timed out")
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started)


def interrupt(argv: list[str], env: dict[str, str], signum: int, folder: Path, inputs: Path) -> Outcome:
    """Start the command, wait until it works, send ``signum``, collect what it says."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "csulora", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_process_env(env), preexec_fn=_sigint_as_at_a_terminal)  # fmt: skip
    note, when = "finished before it could be interrupted", None
    while proc.poll() is None and time.perf_counter() - started < CASE_TIMEOUT_S:
        when = _working(proc.pid, folder, inputs)
        if when:
            time.sleep(0.05)  # inside the work, not at its first byte
            proc.send_signal(signum)
            note = None
            break
        time.sleep(0.005)
    try:
        stdout, stderr = proc.communicate(timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        note = "did not stop after the signal"
    return Outcome(proc.returncode, stdout, stderr, time.perf_counter() - started, note, when)


def _sigint_as_at_a_terminal() -> None:
    """In the child before it starts: SIGINT's default action, as a command typed at a terminal
    has it. A runner started in the background of a non-interactive shell (``cmd &``, nohup)
    inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: the case
    would time out measuring the shell, not csulora."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _working(pid: int, folder: Path, inputs: Path) -> str | None:
    """"staging" once a staging entry appeared beside the output, "input open" once the process
    has an input file open or mapped; None while it is still starting."""
    if any(p.name.startswith(".") for p in folder.iterdir()):
        return "staging"
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    return "input open" if str(inputs) in maps or any(t.startswith(str(inputs)) for t in fds) else None


def rerun(case: Case, argv: list[str], env: dict[str, str], folder: Path, in_process: bool) -> tuple[Outcome, list[str]]:
    """Run twice (the second time with ``--force``); every output file must be byte-identical but the
    run records (``run.json``, ``*.run.json``: timings and machine facts, documented as the one
    file a rerun may change)."""
    first = execute(argv, env, in_process)
    out = Path(argv[argv.index("-o") + 1])
    before = tree_digest(out) if out.exists() else None
    second = execute([*argv, "--force"], env, in_process)
    problems = _exit_problem(case, first) + _exit_problem(case, second)
    if before is not None and not problems:
        after = tree_digest(out)
        differ = sorted(name for name in set(before) | set(after)
                        if before.get(name) != after.get(name) and not is_run_record(name))  # fmt: skip
        if differ:
            problems.append(f"files differ on rerun: {differ}")
    return second, problems


def is_run_record(name: str) -> bool:
    return Path(name).name == "run.json" or name.endswith(".run.json")


def judge_refusal(case: Case, outcome: Outcome) -> list[str]:
    """Exit code, and the message: one ``csulora COMMAND: error:`` line, last on stderr, no traceback."""
    problems = _exit_problem(case, outcome)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in outcome.stderr:
        problems.append("a traceback on stderr")
    word = {"refuse": "error:", "interrupt": {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(case.signal)}
    prefix = f"csulora {case.command}: {word.get(case.kind)}"
    said = [line for line in lines if line.startswith(f"csulora {case.command}: ")]
    if not lines or not lines[-1].startswith(prefix) or len(said) != 1:
        problems.append(f"the message is not one line '{prefix} ...' last on stderr")
    elif case.match and not re.search(case.match, lines[-1]):
        problems.append(f"the message does not match {case.match!r}")
    if lines and case.max_chars and len(lines[-1]) > case.max_chars:
        problems.append(f"the message is {len(lines[-1])} characters long (at most {case.max_chars})")
    return problems


def _exit_problem(case: Case, outcome: Outcome) -> list[str]:
    if outcome.note:
        return [outcome.note]
    if outcome.exit not in case.accepted_exits:
        return [f"exit code {outcome.exit}, expected {' or '.join(map(str, case.accepted_exits))}"]
    return []


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (``path`` itself when a file), by relative name."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(path.rglob("*"))
    }


def _names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def _record(case: Case, argv: list[str], outcome: Outcome, problems: list[str], root: str) -> dict:
    passed = not problems
    if case.owner:
        status = "unexpected pass" if passed else "expected failure"
    else:
        status = "pass" if passed else "fail"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    return {
        "id": case.id, "command": case.command, "class": case.error_class, "kind": case.kind,
        "argv": ["csulora", *(a.replace(root, "ROOT") for a in argv)],
        "expected": {"exit": list(case.accepted_exits), "message": case.match, "max_chars": case.max_chars},
        "got": {"exit": outcome.exit, "stderr_last": (lines[-1][:400].replace(root, "ROOT") if lines else ""),
                "stderr_lines": len(lines), "seconds": round(outcome.seconds, 2),
                **({"signalled_when": outcome.signalled_when} if case.kind == "interrupt" else {})},
        "problems": [p.replace(root, "ROOT") for p in problems], "status": status,
        "owner": case.owner, "reason": case.reason,
    }  # fmt: skip
