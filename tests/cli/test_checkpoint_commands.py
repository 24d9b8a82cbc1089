"""A full fine-tune through the CLI (docs/design.md §5d): the tiny world's aligned model fully
fine-tuned on the attack data, then audited, corrected by every method, loaded in stock
transformers (logits equal the dense formula), evaluated and tuned -- and bad input refused
in one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from csulora.cli import main
from tests.fixtures_tiny import leftovers
from tests.pipeline.test_checkpoint_api import calibrated_update, expected_update

OPTIONS = {
    "scale": ["--factor", "0.5"],
    "resta": ["--restore", "1.0"],
    "csulora": ["--gamma", "4"],
    "safelora": ["--num-layers", "4"],
    "calibrated": ["--strength", "10"],
}


@dataclass(frozen=True)
class TinyFull:
    base: Path
    aligned: Path
    ft: Path
    calibration: Path


_BUILT: dict[str, TinyFull] = {}


@pytest.fixture(scope="session")
def tiny_full(tiny_world, tmp_path_factory) -> TinyFull:
    """A few steps of full fine-tuning on the attack data, and calibration statistics of aligned."""
    if "world" not in _BUILT:
        from csulora.references.calibration import calibrate
        from csulora.training.trainer import TrainConfig, train_full

        root = tmp_path_factory.mktemp("tiny_full")
        config = TrainConfig(steps=4, batch_size=16, lr=2e-3, max_length=56, progress=False)
        ft = train_full(tiny_world.aligned, tiny_world.data / "attack.jsonl", root / "ft", config)
        calibration = root / "calibration.safetensors"
        calibrate(tiny_world.aligned, calibration, task="date:train", max_new_tokens=16, progress=False, device="cpu")
        _BUILT["world"] = TinyFull(tiny_world.base, tiny_world.aligned, Path(ft), calibration)
    return _BUILT["world"]


def run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def fails(argv, capsys, pattern: str) -> None:
    rc, _, err = run(argv, capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and re.search(pattern, err), err


def modules(folder: Path) -> list[str]:
    from csulora.io.checkpoints import CheckpointReader, decoder_linear_modules

    with CheckpointReader(folder) as reader:
        return decoder_linear_modules(reader)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_correct_every_method_then_the_logits_are_the_dense_formula(tiny_full, tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    from csulora.io.adapters import is_sidecar_file
    from tests.fixtures_full import read_tensors
    from tests.pipeline.test_checkpoint_api import dense_inputs

    out = tmp_path / "fixed"
    sources = ["--calibration", tiny_full.calibration] if method == "calibrated" else ["--base", tiny_full.base]
    rc, stdout, err = run(["correct", tiny_full.ft, "-o", out, "--aligned", tiny_full.aligned, "--method", method,
                           *sources, *OPTIONS[method]], capsys)  # fmt: skip
    assert rc == 0, err
    assert f"wrote {out}" in stdout and "written from" in stdout  # the untargeted tensors' table
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    want = AutoModelForCausalLM.from_pretrained(tiny_full.ft, dtype=torch.float64)
    report = json.loads((out / "csulora_report.json").read_text())
    params = dict(want.named_parameters())
    aligned = read_tensors(tiny_full.aligned)
    with torch.no_grad():
        for module in modules(tiny_full.ft):
            dW, D, sub = dense_inputs(tiny_full, module)
            aligned_w = aligned[f"{module}.weight"].double()
            if method == "calibrated":
                X = calibrated_update(tiny_full.calibration, module, dW, 10.0)
            elif method == "safelora":
                X = expected_update("safelora", {"threshold": report["summary"]["safelora_threshold"]}, dW, D, sub)
            else:
                options = {"scale": {"factor": 0.5}, "resta": {"restore": 1.0}, "csulora": {"gamma": 4.0}}[method]
                X = expected_update(method, options, dW, D, sub)
            params[f"{module}.weight"].copy_(aligned_w + X)
        ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=5e-4, rtol=1e-4)
    sidecars = [p.name for p in tiny_full.ft.iterdir() if is_sidecar_file(p.name)]
    assert "tokenizer.json" in sidecars and all((out / name).read_bytes() == (tiny_full.ft / name).read_bytes() for name in sidecars)
    assert not (out / "train_config.json").exists()  # the fine-tune's training record describes the input


def test_audit_json_and_eval_of_the_corrected_checkpoint(tiny_full, tmp_path, capsys, tune_data):
    rc, stdout, err = run(["audit", tiny_full.ft, "--aligned", tiny_full.aligned, "--base", tiny_full.base,
                           "--json", tmp_path / "audit.json"], capsys)  # fmt: skip
    assert rc == 0, err
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["input"] == "checkpoint" and len(audit["modules"]) == len(modules(tiny_full.ft))
    assert {"rho_F", "safelora_cos", "cos_dW_D", "dw_over_d"} <= set(audit["modules"][0])
    assert any(row["tensor"] == "model.embed_tokens.weight" for row in audit["untargeted"])
    fixed = tmp_path / "fixed"
    assert run(["correct", tiny_full.ft, "-o", fixed, "--aligned", tiny_full.aligned, "--base", tiny_full.base,
                "--method", "resta", "--reset-others"], capsys)[0] == 0  # fmt: skip
    rc, stdout, err = run(["eval", fixed, "--harmful", tune_data["advbench"], "--benign", tune_data["benign"],
                           "--task", tune_data["task"], "--max-new-tokens", "8", "-o", tmp_path / "eval"], capsys)  # fmt: skip
    assert rc == 0, err
    row = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"][0]
    assert row["name"] == "fixed" and row["harmful"]["advbench-val"]["asr"] is not None and row["utility"] is not None


def test_tune_a_checkpoint_from_the_cli(tiny_full, tmp_path, capsys, tune_data):
    out = tmp_path / "tuned"
    rc, stdout, err = run(["tune", tiny_full.ft, "-o", out, "--aligned", tiny_full.aligned, "--method", "scale",
                           "--grid", "1,0.5", "--max-asr-gap", "1", "--max-utility-drop", "1", "--max-new-tokens", "8",
                           "--harmful", tune_data["advbench"], tune_data["airt"], "--task", tune_data["task"],
                           "--benign", tune_data["benign"]], capsys)  # fmt: skip
    assert rc == 0, err
    assert (out / "model.safetensors").exists() and (out / "tune.json").exists()
    assert f"corrected checkpoint, tune.json and tune.png written to {out}" in stdout
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_bad_checkpoint_input_is_one_line_and_exit_2(tiny_full, tmp_path, capsys):
    outs = tmp_path / "outs"
    outs.mkdir()
    fails(["correct", tiny_full.ft, "-o", outs / "o", "--method", "scale", "--factor", "0.5"], capsys,
          r"give --aligned ALIGNED")  # fmt: skip
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("x")
    fails(["audit", neither, "--aligned", tiny_full.aligned, "--base", tiny_full.base], capsys,
          r"neither: no adapter_config.json \(not a PEFT adapter\) and no config.json")  # fmt: skip
    existing = outs / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    fails(["correct", tiny_full.ft, "-o", existing, "--aligned", tiny_full.aligned, "--method", "scale", "--factor", "0.5"],
          capsys, r"exists and is not empty \(use --force")  # fmt: skip
    fails(["correct", tiny_full.ft, "-o", outs / "o", "--aligned", tiny_full.aligned, "--method", "calibrated"], capsys,
          r"needs activation statistics")  # fmt: skip
    assert sorted(p.name for p in outs.iterdir()) == ["existing"] and leftovers(outs) == []


def test_reset_others_is_for_checkpoints_only(tmp_path, capsys, tiny_world):
    from tests.fixtures_tiny import build_adapter

    adapter = build_adapter(tmp_path / "adapter")
    capsys.readouterr()  # the library's warnings while building it are not the command's output
    fails(["correct", adapter, "-o", tmp_path / "o", "--base", tiny_world.base, "--aligned", tiny_world.aligned,
           "--method", "resta", "--reset-others"], capsys, r"--reset-others applies to full checkpoints only")  # fmt: skip
