import os
import subprocess
import sys

import pytest

from csulora.cli import build_parser, main


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
