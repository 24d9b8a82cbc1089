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
