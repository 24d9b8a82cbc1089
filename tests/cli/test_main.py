import os
import subprocess
import sys

import pytest

from csulora.cli import build_parser, main
from tests.fixtures_tiny import tiny_pair  # noqa: F401


def test_help_lists_commands():
    text = build_parser().format_help()
    assert "usage: csulora" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "csulora" in capsys.readouterr().out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "csulora", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "COMMAND" in proc.stdout


def test_correction_commands_start_torch_with_passive_omp_waits_and_huge_pages():
    """Set before torch loads (docs/benchmarks.md): a fresh interpreter shows what the runtime saw."""
    probe = (
        "import os, sys; from csulora.cli import _prefer_passive_waits; _prefer_passive_waits(sys.argv[1:]); "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}
    runs = {
        args: subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env).stdout.split()
        for args in (("correct", "x"), ("subspace",), ("eval",))
    }
    assert runs[("correct", "x")] == ["PASSIVE", "1"] and runs[("subspace",)] == ["PASSIVE", "1"]
    assert runs[("eval",)] == ["None", "1"]  # generation keeps OpenMP's default
    user = subprocess.run([sys.executable, "-c", probe, "correct"], capture_output=True, text=True,
                          env={**env, "OMP_WAIT_POLICY": "ACTIVE"}).stdout.split()
    assert user[0] == "ACTIVE"  # a user's own setting wins


def test_top_level_help_names_both_kinds_of_update_and_calibrate():
    text = " ".join(build_parser().format_help().split())
    assert "LoRA adapter" in text and "fully fine-tuned checkpoint" in text and "`calibrate`" in text


@pytest.mark.parametrize("signum, code, word", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_signal_while_writing_leaves_nothing_behind(tiny_pair, tmp_path, capsys, monkeypatch, signum, code, word):
    """issue 23: SIGINT and SIGTERM in the middle of writing an output: one line, the staging file removed,
    exit 130/143. Python's default SIGTERM kills the process without running any cleanup."""
    import signal

    import csulora.io.atomic as atomic

    finish = atomic.apply_usual_modes

    def signal_then_finish(path):
        os.kill(os.getpid(), signum)  # delivered at the next bytecode, inside the writer
        finish(path)

    monkeypatch.setattr(atomic, "apply_usual_modes", signal_then_finish)
    out = tmp_path / "outs" / "s.safetensors"
    out.parent.mkdir()
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["subspace", str(tiny_pair[0]), str(tiny_pair[1]), "-o", str(out)]) == code
    err = capsys.readouterr().err.strip()
    assert err == f"csulora subspace: {word}; no partial output is left behind"
    assert list(out.parent.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous  # restored for the caller
