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
from csulora.cli.tuning import config_from_args


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
    return [
        "tune", str(f["adapter"]), "-o", str(f["out"]), "--aligned", str(f["aligned"]),
        "--subspace", str(f["subspace"]), "--harmful", str(f["harmful"]), *extra,
    ]  # fmt: skip


def test_parser_defaults_follow_the_contract():
    args = build_parser().parse_args(["tune", "A", "-o", "O", "--aligned", "M", "--base", "B"])
    assert (args.method, args.grid, args.harmful, args.task, args.benign) == ("resta", None, None, None, None)
    assert (args.max_asr_gap, args.max_utility_drop, args.max_new_tokens, args.force) == (0.05, 0.05, 64, False)
    config = config_from_args(args)
    assert config.grid == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0) and config.method_options == {}
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
    for flag in ("--aligned", "--subspace", "--base", "--method", "--grid", "--harmful", "--task", "--benign",
                 "--max-asr-gap", "--max-utility-drop", "--max-new-tokens", "--force"):  # fmt: skip
        assert flag in out


def test_subspace_or_base_is_required(folders, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune", str(folders["adapter"]), "-o", str(folders["out"]), "--aligned", str(folders["aligned"])])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(argv(folders, "--base", str(folders["aligned"])))  # both given


BAD_INPUT = [
    (("--grid", "0,-0.5"), "--grid -0.5: --restore must be >= 0"),
    (("--method", "scale", "--grid", "1,1.2"), "--grid 1.2: --factor must be in [0.0, 1.0]"),
    (("--grid", ""), "--grid: expected a comma-separated list"),
    (("--grid", "1,x"), "'x' is not a number"),
    (("--method", "csulora", "--grid", "-1"), "--gamma must be >= 0"),
    (("--method", "safelora", "--grid", "2"), "--threshold must be in [-1.0, 1.0]"),
    (("--restore", "1"), "--restore applies to --method csulora only"),
    (("--max-asr-gap", "2"), "--max-asr-gap must be a fraction"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be a positive integer"),
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
