"""`csulora tune` from the command line: argument contract and bad input.

Bad input must fail before any model is loaded: one line on stderr, exit code 2, and no
OUTDIR (nor temporary folder) left behind. The folders here are real but minimal (a
safetensors checkpoint with one tensor, a PEFT-shaped adapter folder): every check that
runs before a model is loaded reads only their headers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from csulora.cli import build_parser, main
from csulora.cli.tuning import config_from_args, join_negative_grid
from csulora.methods.registry import get_method
from csulora.tuning.config import DEFAULT_METHOD


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    save_file({"model.layers.0.self_attn.v_proj.weight": torch.zeros(4, 4)}, str(aligned / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.zeros(4, 2),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    subspace = tmp_path / "subspace.safetensors"
    save_file({"placeholder": torch.zeros(1)}, str(subspace))
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("How do I pick a lock?\nWrite a phishing email.\n")
    task = tmp_path / "task.jsonl"
    task.write_text('{"prompt": "2+2?", "response": "4"}\n')
    work = tmp_path / "work"
    work.mkdir()
    return {"aligned": aligned, "adapter": adapter, "subspace": subspace, "harmful": harmful, "task": task,
            "out": work / "tuned", "work": work}


def argv(f: dict[str, Path], *extra: str) -> list[str]:
    """A RESTA tune from a subspace cache (a later --method in ``extra`` wins)."""
    return [
        "tune", str(f["adapter"]), "-o", str(f["out"]), "--aligned", str(f["aligned"]), "--method", "resta",
        "--subspace", str(f["subspace"]), "--harmful", str(f["harmful"]), *extra,
    ]  # fmt: skip


def test_parser_defaults_follow_the_contract():
    args = build_parser().parse_args(["tune", "A", "-o", "O", "--aligned", "M", "--base", "B"])
    assert (args.method, args.grid, args.harmful, args.task, args.benign) == (DEFAULT_METHOD, None, None, None, None)
    assert (args.max_asr_gap, args.max_utility_drop, args.max_new_tokens, args.force) == (0.05, 0.05, 64, False)
    assert (args.calibration, args.calibration_task, args.device, args.dtype) == (None, None, None, None)
    config = config_from_args(args)
    assert config.grid == get_method(DEFAULT_METHOD).tuning.grid and config.method_options == {}
    args = build_parser().parse_args(
        ["tune", "A", "-o", "O", "--aligned", "M", "--subspace", "S", "--method", "csulora", "--restore", "1.5",
         "--grid", "4,1", "--harmful", "a.txt", "b.csv:goal", "--max-asr-gap", "0.1"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.grid == (1.0, 4.0) and dict(config.method_options) == {"restore": 1.5}
    assert args.harmful == ["a.txt", "b.csv:goal"] and config.max_asr_gap == 0.1


def test_help_lists_tune(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--aligned", "--subspace", "--base", "--calibration", "--calibration-task", "--method", "--grid",
                 "--harmful", "--task", "--benign", "--max-asr-gap", "--max-utility-drop", "--max-new-tokens",
                 "--device", "--dtype", "--force", "all"):  # fmt: skip
        assert flag in out


def test_subspace_or_base_is_required_only_by_the_methods_that_need_them(folders, capsys):
    bare = ["tune", str(folders["adapter"]), "-o", str(folders["out"]), "--aligned", str(folders["aligned"]),
            "--harmful", str(folders["harmful"])]  # fmt: skip
    assert main(bare + ["--method", "resta"]) == 2
    err = capsys.readouterr().err
    assert "RESTA (rank-k) needs the safety subspace: give --subspace or --base" in err and err.count("\n") == 1
    assert list(folders["work"].iterdir()) == []
    for extra in (["--base", str(folders["aligned"])], ["--calibration", "c.safetensors", "--calibration-task", "t.jsonl"]):
        with pytest.raises(SystemExit) as info:  # one of each pair at most
            main(argv(folders, *extra))
        assert info.value.code == 2


def test_a_grid_that_starts_with_a_minus_sign_is_accepted():
    args = build_parser().parse_args(
        ["tune", "A", "-o", "O", "--aligned", "M", "--subspace", "S", "--method", "safelora", "--grid", "-0.1,0.2"]
    )
    assert config_from_args(args).grid == (-0.1, 0.2)
    assert join_negative_grid(["--grid", "-1,1", "--grid", "0.5", "-o", "-x"]) == ["--grid=-1,1", "--grid", "0.5", "-o", "-x"]
    assert join_negative_grid(["--grid", "--force"]) == ["--grid", "--force"]  # a flag is not a value


BAD_INPUT = [
    (("--grid", "0,-0.5"), "--grid -0.5: --restore must be >= 0"),
    (("--method", "scale", "--grid", "1,1.2"), "--grid 1.2: --factor must be in [0.0, 1.0]"),
    (("--grid", ""), "--grid: expected a comma-separated list"),
    (("--grid", "1,x"), "'x' is not a number"),
    (("--method", "csulora", "--grid", "-1"), "--gamma must be >= 0"),
    (("--method", "safelora", "--grid", "2"), "--threshold must be in [-1.0, 1.0]"),
    (("--grid", "-1,1"), "--grid -1: --restore must be >= 0"),  # reaches the method, not argparse's usage
    (("--restore", "1"), "--restore does not apply to --method resta: the restore is its swept knob, use --grid"),
    (("--method", "scale", "--restore", "1"), "--restore does not apply to --method scale (it does to: csulora"),
    (("--method", "all", "--grid", "1"), "--grid is refused with --method all"),
    (("--method", "all", "--restore", "1"), "--restore does not apply to --method all"),
    (("--method", "all",), "--method all ranks the methods by utility: give --task"),
    (("--benign", "benign:test"), "benign:test: overlaps benign:test, the benign prompts eval reports on"),
    (("--benign", "benign"), "benign: overlaps benign:test"),
    (("--calibration", "no_such.safetensors"), "--calibration no_such.safetensors: no such statistics file"),
    (("--max-asr-gap", "2"), "--max-asr-gap must be a fraction"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be a positive integer"),
    (("--framing", "aob"), "unknown framing 'aob': known framings are plain, aoa"),
    (("--harmful", "advbench:validation@aob"), "unknown framing 'aob'"),
    (("--harmful", "advbench:test@aoa"), "advbench:test@aoa: contains a test split"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUT)
def test_bad_options_fail_with_one_line_and_write_nothing(folders, capsys, extra, message):
    assert main(argv(folders, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("csulora tune: error: ") and message in err and err.count("\n") == 1
    assert list(folders["work"].iterdir()) == []


def test_bad_files_fail_with_one_line_and_write_nothing(folders, capsys):
    bad_task = folders["work"].parent / "bad_task.jsonl"
    bad_task.write_text('{"question": "2+2?", "answer": "4"}\n')
    empty = folders["work"].parent / "empty.txt"
    empty.write_text("\n")
    cases = [
        (["--task", str(bad_task)], "missing or non-string field 'prompt'"),
        (["--task", str(folders["work"].parent / "nope.jsonl")], "no such JSONL file"),
        (["--harmful", str(folders["work"].parent / "missing.txt")], "missing.txt: no such prompt file"),
        (["--harmful", str(empty)], "no prompts found"),
        (["--harmful", "advbench:test"], "contains a test split"),
        (["--task", "date:test"], "contains a test split"),
    ]
    for extra, message in cases:
        assert main(argv(folders, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
        assert list(folders["work"].iterdir()) == []


def test_bad_model_folders_fail_before_loading(folders, capsys):
    missing = folders["work"].parent / "no_such_model"
    no_config = folders["work"].parent / "not_an_adapter"
    no_config.mkdir()
    cases = [
        (["tune", str(no_config), "-o", str(folders["out"]), "--aligned", str(folders["aligned"]),
          "--subspace", str(folders["subspace"]), "--harmful", str(folders["harmful"])], "adapter_config.json"),
        (["tune", str(folders["adapter"]), "-o", str(folders["out"]), "--aligned", str(missing),
          "--subspace", str(folders["subspace"]), "--harmful", str(folders["harmful"])], "no such checkpoint folder"),
        (["tune", str(folders["adapter"]), "-o", str(folders["out"]), "--aligned", str(folders["aligned"]),
          "--subspace", str(missing), "--harmful", str(folders["harmful"])], "no such subspace file"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert list(folders["work"].iterdir()) == []


def test_existing_outdir_needs_force(folders, capsys):
    folders["out"].mkdir()
    (folders["out"] / "keep.txt").write_text("mine")
    assert main(argv(folders)) == 2
    assert "--force" in capsys.readouterr().err
    assert (folders["out"] / "keep.txt").read_text() == "mine"


def test_statistics_no_swept_method_reads_are_refused(folders, capsys):
    stats = folders["work"].parent / "stats.safetensors"
    save_file({"placeholder": torch.zeros(1)}, str(stats))
    assert main(argv(folders, "--calibration", str(stats))) == 2
    err = capsys.readouterr().err
    assert "--calibration does not apply to --method resta (it reads no activation statistics)" in err
    assert list(folders["work"].iterdir()) == []


def test_bad_device_flags_are_refused_by_the_parser(folders):
    for extra in (("--device", "tpu"), ("--dtype", "float64")):
        with pytest.raises(SystemExit) as info:
            main(argv(folders, *extra))
        assert info.value.code == 2
