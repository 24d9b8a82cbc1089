"""``csulora subspace | audit | correct`` through ``csulora.cli.main`` (in-process), plus one
run of the installed console script. Every bad input: exit code != 0, one line on stderr
naming the file/tensor, and nothing left behind (no OUTDIR, no temporary folder)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from csulora.cli import main
from csulora.io.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.fixtures_tiny import leftovers, tiny_adapter, tiny_calibration, tiny_pair, tiny_subspace  # noqa: F401
from tests.output_modes import assert_usual_modes, umask  # noqa: F401

Q = "model.layers.0.self_attn.q_proj"
LORA_A = f"base_model.model.{Q}.lora_A.weight"


@pytest.fixture
def outs(tmp_path) -> Path:
    """A clean parent for outputs, so leftovers (temp dirs) are easy to see."""
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder


def fails(argv, capsys, pattern: str) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


def assert_nothing_written(outs: Path) -> None:
    assert list(outs.iterdir()) == [], sorted(p.name for p in outs.iterdir())


def edit_safetensors(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        metadata = f.metadata()
    edit(tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- happy paths ----------------------------------------------------------------------------------
def test_subspace_command_writes_a_cache(tiny_pair, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert main(["subspace", str(tiny_pair[0]), str(tiny_pair[1]), "-o", str(out), "--rank", "2",
                 "--targets", "q_proj,v_proj"]) == 0
    assert "4 modules" in capsys.readouterr().out
    from csulora.io.subspace_cache import load_subspace_cache

    cache = load_subspace_cache(out)
    assert cache.options["rank"] == 2 and {e.rank for e in cache.entries.values()} == {2}


def test_audit_prints_a_table_and_writes_json_and_plot(tiny_adapter, tiny_subspace, tmp_path, capsys):
    js, png = tmp_path / "a.json", tmp_path / "a.png"
    assert main(["audit", str(tiny_adapter), "--subspace", str(tiny_subspace), "--json", str(js),
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert Q in out and "rho_F" in out and "cos(dW,D)" in out
    data = json.loads(js.read_text())
    assert len(data["modules"]) == 4 and data["d_source"] == "rank-k"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method, flags", [
    ("csulora", ["--gamma", "2", "--schedule", "ratio", "--rank-mode", "compress", "--restore", "0.5"]),
    ("safelora", ["--select", "threshold", "--threshold", "0.3", "--projection", "exact"]),
    ("scale", ["--factor", "0.5"]),
    ("resta", ["--restore", "1.0"]),
])
def test_correct_each_method(tiny_adapter, tiny_subspace, outs, capsys, method, flags):
    report_file = outs / "r.json"
    argv = ["correct", tiny_adapter, "-o", outs / "o", "--subspace", tiny_subspace, "--method", method,
            "--report", report_file, *flags]
    assert main([str(a) for a in argv]) == 0
    assert (outs / "o" / ADAPTER_WEIGHTS).exists() and (outs / "o" / ADAPTER_CONFIG).exists()
    report = json.loads(report_file.read_text())
    assert report["method"] == method and len(report["modules"]) == 4
    assert "wrote" in capsys.readouterr().out
    assert leftovers(outs) == []


def test_correct_from_base_and_aligned_with_subspace_options(tiny_adapter, tiny_pair, outs):
    assert main(["correct", str(tiny_adapter), "-o", str(outs / "o"), "--base", str(tiny_pair[0]),
                 "--aligned", str(tiny_pair[1]), "--method", "safelora", "--num-layers", "2"]) == 0
    report = json.loads((outs / "o" / "csulora_report.json").read_text())
    assert report["d_source"] == "exact" and report["summary"]["num_projected"] >= 2
    assert main(["correct", str(tiny_adapter), "-o", str(outs / "o2"), "--base", str(tiny_pair[0]),
                 "--aligned", str(tiny_pair[1]), "--method", "resta", "--rank", "1"]) == 0
    report = json.loads((outs / "o2" / "csulora_report.json").read_text())
    assert {row["subspace_rank"] for row in report["modules"]} == {1}


def test_targets_restrict_audit_and_correct(tiny_adapter, tiny_subspace, outs, tmp_path, capsys):
    js = tmp_path / "a.json"
    assert main(["audit", str(tiny_adapter), "--subspace", str(tiny_subspace), "--targets", "q_proj",
                 "--json", str(js)]) == 0
    assert {m["module"].rsplit(".", 1)[-1] for m in json.loads(js.read_text())["modules"]} == {"q_proj"}
    assert main(["correct", str(tiny_adapter), "-o", str(outs / "o"), "--subspace", str(tiny_subspace),
                 "--method", "scale", "--factor", "0.5", "--targets", "q_proj"]) == 0
    report = json.loads((outs / "o" / "csulora_report.json").read_text())
    assert len(report["modules"]) == 2
    with safe_open(str(tiny_adapter / ADAPTER_WEIGHTS), "pt") as before, \
            safe_open(str(outs / "o" / ADAPTER_WEIGHTS), "pt") as after:
        for key in before.keys():
            same = torch.equal(before.get_tensor(key), after.get_tensor(key))
            assert same == ("v_proj" in key or "lora_A" in key), key  # scale shrinks q_proj's B only
    capsys.readouterr()
    fails(["correct", tiny_adapter, "-o", outs / "o2", "--subspace", tiny_subspace, "--method", "scale",
           "--factor", "0.5", "--targets", "mlp.nothing"], capsys, r"--targets mlp.nothing matches no module")
    assert not (outs / "o2").exists() and leftovers(outs) == []


def test_existing_outdir_needs_force(tiny_adapter, tiny_subspace, outs, capsys):
    out = outs / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["correct", tiny_adapter, "-o", out, "--subspace", tiny_subspace, "--method", "scale", "--factor", "0.5"]
    fails(argv, capsys, r"exists and is not empty \(use --force")
    assert (out / "keep.txt").read_text() == "mine" and leftovers(outs) == []
    assert main([str(a) for a in [*argv, "--force"]]) == 0
    assert not (out / "keep.txt").exists() and (out / ADAPTER_WEIGHTS).exists()
    assert leftovers(outs) == []


def test_existing_subspace_file_needs_force(tiny_pair, outs, capsys):
    """issue 13: `subspace -o FILE` replaced an existing file silently."""
    out = outs / "s.safetensors"
    out.write_text("mine")
    argv = ["subspace", tiny_pair[0], tiny_pair[1], "-o", out, "--rank", "1"]
    fails(argv, capsys, r"s.safetensors: file exists \(use --force to replace it\)")
    assert out.read_text() == "mine" and leftovers(outs) == []
    assert main([str(a) for a in [*argv, "--force"]]) == 0
    assert out.read_bytes()[8:9] == b"{" and leftovers(outs) == []  # a safetensors header now


@pytest.mark.parametrize("flag, name", [("--json", "a.json"), ("--plot", "a.png")])
def test_existing_audit_files_need_force(tiny_adapter, tiny_subspace, outs, capsys, flag, name):
    """issue 13: `audit --json/--plot FILE` replaced an existing file silently."""
    out = outs / name
    out.write_text("mine")
    argv = ["audit", tiny_adapter, "--subspace", tiny_subspace, flag, out]
    fails(argv, capsys, rf"{flag} .*{name}: file exists \(use --force to replace it\)")
    assert out.read_text() == "mine" and leftovers(outs) == []
    assert main([str(a) for a in [*argv, "--force"]]) == 0
    assert out.read_text(errors="replace") != "mine" and leftovers(outs) == []


def test_existing_report_file_outside_outdir_needs_force(tiny_adapter, tiny_subspace, outs, capsys):
    report = outs / "r.json"
    report.write_text("mine")
    argv = ["correct", tiny_adapter, "-o", outs / "o", "--subspace", tiny_subspace, "--method", "scale",
            "--factor", "0.5", "--report", report]
    fails(argv, capsys, r"--report .*r.json: file exists \(use --force")
    assert report.read_text() == "mine" and not (outs / "o").exists() and leftovers(outs) == []
    assert main([str(a) for a in [*argv, "--force"]]) == 0
    assert json.loads(report.read_text())["method"] == "scale"


# -- output modes follow the umask (issue 13: folders were 0700, safetensors files 0600) ---------------
def test_corrected_adapter_folder_has_usual_modes(tiny_adapter, tiny_subspace, outs, umask):
    out = outs / "o"
    assert main(["correct", str(tiny_adapter), "-o", str(out), "--subspace", str(tiny_subspace),
                 "--method", "scale", "--factor", "0.5"]) == 0
    assert_usual_modes(out, umask)


def test_subspace_file_has_usual_mode(tiny_pair, outs, umask):
    out = outs / "s.safetensors"
    assert main(["subspace", str(tiny_pair[0]), str(tiny_pair[1]), "-o", str(out), "--rank", "1"]) == 0
    assert_usual_modes(out, umask)


def test_audit_json_and_plot_have_usual_modes(tiny_adapter, tiny_subspace, outs, umask):
    js, png = outs / "a.json", outs / "a.png"
    assert main(["audit", str(tiny_adapter), "--subspace", str(tiny_subspace), "--json", str(js),
                 "--plot", str(png)]) == 0
    assert_usual_modes(js, umask)
    assert_usual_modes(png, umask)


def test_forced_overwrite_of_a_0644_subspace_file_stays_0644(tiny_pair, outs):
    import os

    out = outs / "s.safetensors"
    out.write_text("old")
    out.chmod(0o644)
    previous = os.umask(0o022)
    try:
        assert main(["subspace", str(tiny_pair[0]), str(tiny_pair[1]), "-o", str(out), "--rank", "1", "--force"]) == 0
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644


# -- bad options (validated before any tensor is read) ------------------------------------------------
@pytest.mark.parametrize("flags, pattern", [
    (["--method", "csulora", "--gamma", "-0.5"], r"--gamma must be >= 0"),
    (["--method", "safelora", "--select", "threshold", "--threshold", "1.5", "--projection", "exact"],
     r"--threshold must be in \[-1"),
    (["--method", "safelora", "--threshold", "-2", "--projection", "exact"], r"--threshold must be in \[-1"),
    (["--method", "safelora", "--num-layers", "0", "--projection", "exact"], r"--num-layers"),
    (["--method", "scale", "--factor", "1.5"], r"--factor must be in \[0"),
    (["--method", "scale"], r"needs --factor"),
    (["--method", "resta", "--restore", "-1"], r"--restore must be >= 0"),
    (["--method", "scale", "--factor", "0.5", "--gamma", "1"], r"--gamma does not apply to --method scale"),
    (["--method", "safelora"], r"needs the exact D: use --projection exact or give --base/--aligned"),
    (["--method", "resta", "--energy", "0.5"], r"do not apply with --subspace"),
])
def test_bad_correct_options(tiny_adapter, tiny_subspace, outs, capsys, flags, pattern):
    fails(["correct", tiny_adapter, "-o", outs / "o", "--subspace", tiny_subspace, *flags], capsys, pattern)
    assert_nothing_written(outs)


@pytest.mark.parametrize("flags, pattern", [
    (["--energy", "0"], r"--energy must be in \(0, 1\]"),
    (["--energy", "1.5"], r"--energy must be in \(0, 1\]"),
    (["--rank", "0"], r"--rank must be an integer >= 1"),
    (["--max-rank", "0"], r"--max-rank"),
])
def test_bad_subspace_options(tiny_pair, outs, capsys, flags, pattern):
    fails(["subspace", tiny_pair[0], tiny_pair[1], "-o", outs / "s.safetensors", *flags], capsys, pattern)
    fails(["correct", outs / "no-adapter", "-o", outs / "o", "--base", tiny_pair[0], "--aligned", tiny_pair[1],
           "--method", "resta", *flags], capsys, pattern)
    assert_nothing_written(outs)


def test_sources_must_be_complete(tiny_adapter, tiny_pair, outs, capsys):
    fails(["correct", tiny_adapter, "-o", outs / "o", "--base", tiny_pair[0], "--method", "resta"], capsys,
          "--base needs --aligned ALIGNED too")
    fails(["audit", tiny_adapter], capsys, "give --subspace FILE or --base BASE --aligned ALIGNED")
    # ALIGNED alone is no source of D (docs/design.md §10): a method that reads D still needs one.
    fails(["correct", tiny_adapter, "-o", outs / "o", "--aligned", tiny_pair[1], "--method", "resta"], capsys,
          "needs the safety subspace")
    assert_nothing_written(outs)


# -- bad inputs ----------------------------------------------------------------------------------------
def test_adapter_shape_mismatch_shows_both_shapes(tiny_adapter, tiny_pair, tmp_path, outs, capsys):
    adapter = copy_dir(tiny_adapter, tmp_path / "a")

    def narrow(t):
        t[LORA_A] = t[LORA_A][:, :24].contiguous()

    edit_safetensors(tiny_adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_WEIGHTS, narrow)
    err = fails(["correct", adapter, "-o", outs / "o", "--base", tiny_pair[0], "--aligned", tiny_pair[1],
                 "--method", "resta"], capsys, Q)
    assert "[32, 24]" in err and "[32, 32]" in err
    assert_nothing_written(outs)


def test_adapter_shape_mismatch_against_subspace_cache(tiny_adapter, tiny_subspace, tmp_path, outs, capsys):
    adapter = copy_dir(tiny_adapter, tmp_path / "a")

    def narrow(t):
        t[LORA_A] = t[LORA_A][:, :24].contiguous()

    edit_safetensors(tiny_adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_WEIGHTS, narrow)
    err = fails(["audit", adapter, "--subspace", tiny_subspace], capsys, Q)
    assert "[32, 24]" in err and "[32, 32]" in err


def test_base_aligned_shape_mismatch_shows_both_shapes(tiny_adapter, tiny_pair, tmp_path, outs, capsys):
    aligned = copy_dir(tiny_pair[1], tmp_path / "aligned")

    def reshape(t):
        t[f"{Q}.weight"] = torch.zeros(32, 16)

    edit_safetensors(tiny_pair[1] / "model.safetensors", aligned / "model.safetensors", reshape)
    err = fails(["correct", tiny_adapter, "-o", outs / "o", "--base", tiny_pair[0], "--aligned", aligned,
                 "--method", "csulora"], capsys, f"{Q}.weight")
    assert "[32, 16]" in err and "[32, 32]" in err
    assert_nothing_written(outs)


def test_adapter_module_missing_from_the_model(tiny_adapter, tiny_pair, tiny_subspace, tmp_path, outs, capsys):
    adapter = copy_dir(tiny_adapter, tmp_path / "a")

    def rename(t):
        for key in list(t):
            if Q in key:
                t[key.replace("layers.0.", "layers.5.")] = t.pop(key)

    edit_safetensors(tiny_adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_WEIGHTS, rename)
    fails(["correct", adapter, "-o", outs / "o", "--base", tiny_pair[0], "--aligned", tiny_pair[1],
           "--method", "csulora"], capsys, r"no tensor model\.layers\.5\.self_attn\.q_proj\.weight")
    fails(["correct", adapter, "-o", outs / "o", "--subspace", tiny_subspace, "--method", "csulora"], capsys,
          r"no subspace for module model\.layers\.5\.self_attn\.q_proj")
    assert_nothing_written(outs)


def test_different_architectures(tiny_adapter, tiny_pair, tmp_path, outs, capsys):
    aligned = copy_dir(tiny_pair[1], tmp_path / "aligned")
    config = json.loads((aligned / "config.json").read_text())
    config["model_type"] = "mistral"
    (aligned / "config.json").write_text(json.dumps(config))
    fails(["correct", tiny_adapter, "-o", outs / "o", "--base", tiny_pair[0], "--aligned", aligned,
           "--method", "csulora"], capsys, r"different architecture.*model_type")
    fails(["subspace", tiny_pair[0], aligned, "-o", outs / "s.safetensors"], capsys, r"different architecture")
    assert_nothing_written(outs)


@pytest.mark.parametrize("which, value, word", [(1, float("nan"), "NaN"), (0, float("inf"), "Inf")])
def test_nan_or_inf_in_a_checkpoint_tensor(tiny_adapter, tiny_pair, tmp_path, outs, capsys, which, value, word):
    pair = list(tiny_pair)
    pair[which] = copy_dir(tiny_pair[which], tmp_path / "poisoned")
    target = "model.layers.1.self_attn.v_proj.weight"

    def poison(t):
        t[target][2, 3] = value

    edit_safetensors(tiny_pair[which] / "model.safetensors", pair[which] / "model.safetensors", poison)
    fails(["correct", tiny_adapter, "-o", outs / "o", "--base", pair[0], "--aligned", pair[1], "--method",
           "csulora"], capsys, rf"poisoned/model.safetensors: tensor {re.escape(target)} contains {word}")
    fails(["subspace", pair[0], pair[1], "-o", outs / "s.safetensors"], capsys, rf"{re.escape(target)} contains {word}")
    assert_nothing_written(outs)


def test_nan_in_adapter(tiny_adapter, tiny_subspace, tmp_path, outs, capsys):
    adapter = copy_dir(tiny_adapter, tmp_path / "a")

    def poison(t):
        t[LORA_A][0, 0] = float("nan")

    edit_safetensors(tiny_adapter / ADAPTER_WEIGHTS, adapter / ADAPTER_WEIGHTS, poison)
    fails(["correct", adapter, "-o", outs / "o", "--subspace", tiny_subspace, "--method", "resta"], capsys,
          rf"{re.escape(LORA_A)} contains NaN")
    assert_nothing_written(outs)


def test_truncated_checkpoint_and_corrupt_cache(tiny_adapter, tiny_pair, tiny_subspace, tmp_path, outs, capsys):
    aligned = copy_dir(tiny_pair[1], tmp_path / "aligned")
    data = (aligned / "model.safetensors").read_bytes()
    (aligned / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails(["correct", tiny_adapter, "-o", outs / "o", "--base", tiny_pair[0], "--aligned", aligned, "--method",
           "csulora"], capsys, r"aligned/model.safetensors: not a readable safetensors file")
    cache = tmp_path / "cache.safetensors"
    cache.write_bytes(tiny_subspace.read_bytes()[:-100])
    fails(["correct", tiny_adapter, "-o", outs / "o", "--subspace", cache, "--method", "csulora"], capsys,
          r"cache.safetensors: truncated or corrupt")
    assert_nothing_written(outs)


def test_missing_config_unsupported_config_and_bin_only(tiny_adapter, tiny_subspace, tmp_path, outs, capsys):
    base_argv = ["-o", outs / "o", "--subspace", tiny_subspace, "--method", "csulora"]
    no_config = copy_dir(tiny_adapter, tmp_path / "no_config")
    (no_config / ADAPTER_CONFIG).unlink()
    fails(["correct", no_config, *base_argv], capsys, r"no_config: no adapter_config.json")
    dora = copy_dir(tiny_adapter, tmp_path / "dora")
    config = json.loads((dora / ADAPTER_CONFIG).read_text())
    config["use_dora"] = True
    (dora / ADAPTER_CONFIG).write_text(json.dumps(config))
    fails(["correct", dora, *base_argv], capsys, r"adapter_config.json: unsupported PEFT config: DoRA")
    bin_only = copy_dir(tiny_adapter, tmp_path / "bin_only")
    (bin_only / ADAPTER_WEIGHTS).rename(bin_only / "adapter_model.bin")
    fails(["correct", bin_only, *base_argv], capsys, r"only pickled adapter weights.*safetensors")
    fails(["audit", bin_only, "--subspace", tiny_subspace], capsys, r"only pickled adapter weights")
    assert_nothing_written(outs)


def test_pickled_checkpoint_is_refused(tiny_adapter, tiny_pair, tmp_path, outs, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    fails(["correct", tiny_adapter, "-o", outs / "o", "--base", tiny_pair[0], "--aligned", pickled,
           "--method", "csulora"], capsys, r"only pickled weights found.*safe_serialization=True")
    assert_nothing_written(outs)


# -- the calibrated method (docs/design.md §5c) ----------------------------------------------------------
def test_correct_calibrated_needs_only_the_statistics(tiny_adapter, tiny_calibration, outs, capsys):
    assert main(["correct", str(tiny_adapter), "-o", str(outs / "o"), "--method", "calibrated",
                 "--calibration", str(tiny_calibration), "--strength", "10", "--mu", "0.05"]) == 0
    report = json.loads((outs / "o" / "csulora_report.json").read_text())
    assert report["method"] == "calibrated" and report["options"] == {"strength": 10.0, "mu": 0.05, "restore": 0.0}
    assert report["sources"]["calibration"] == str(tiny_calibration) and len(report["modules"]) == 4
    assert all(0.0 <= row["harmful_action_kept"] < row["task_action_kept"] for row in report["modules"])
    assert "wrote" in capsys.readouterr().out and leftovers(outs) == []


@pytest.mark.parametrize("flags, pattern", [
    (["--method", "calibrated"], r"needs activation statistics: give --calibration FILE"),
    (["--method", "calibrated", "--calibration", "{cal}", "--strength", "-1"], r"--strength must be >= 0"),
    (["--method", "calibrated", "--calibration", "{cal}", "--mu", "0"], r"--mu must be > 0"),
    (["--method", "calibrated", "--calibration", "{cal}", "--restore", "1"], r"needs the safety subspace"),
    (["--method", "calibrated", "--calibration", "{cal}", "--targets", "q_proj"], r"must correct every adapted module"),
    (["--method", "resta", "--subspace", "{sub}", "--calibration", "{cal}"], r"--calibration does not apply"),
    (["--method", "calibrated", "--calibration", "{pickle}"], r"pickled files are never loaded"),
    (["--method", "calibrated", "--calibration", "{sub}"], r"not a csulora calibration file"),
])
def test_bad_calibrated_options_and_files(tiny_adapter, tiny_calibration, tiny_subspace, tmp_path, outs, capsys,
                                          flags, pattern):
    pickled = tmp_path / "calibration.pt"
    pickled.write_bytes(b"not a pickle")
    paths = {"{cal}": tiny_calibration, "{sub}": tiny_subspace, "{pickle}": pickled}
    fails(["correct", tiny_adapter, "-o", outs / "o", *(paths.get(flag, flag) for flag in flags)], capsys, pattern)
    assert_nothing_written(outs)


# -- the console script ------------------------------------------------------------------------------
def test_console_script_entry_point(tiny_adapter, tiny_subspace, outs):
    script = Path(sys.executable).parent / "csulora"
    proc = subprocess.run(
        [str(script), "correct", str(tiny_adapter), "-o", str(outs / "o"), "--subspace", str(tiny_subspace),
         "--method", "resta", "--restore", "0.5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (outs / "o" / ADAPTER_WEIGHTS).exists()
    assert "resta" not in proc.stderr or "error" not in proc.stderr


# -- issue 23: outputs never touch inputs; help that says what is true -------------------------------
@pytest.mark.parametrize("flag, target", [
    ("--json", lambda a: a / ADAPTER_CONFIG),  # onto an input's file
    ("--json", lambda a: a / "audit.json"),  # inside the input adapter
    ("--plot", lambda a: a / "audit.png"),
])
def test_audit_reports_never_replace_or_enter_an_input(tiny_adapter, tiny_subspace, tmp_path, capsys, flag, target):
    adapter = copy_dir(tiny_adapter, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    fails(["audit", adapter, "--subspace", tiny_subspace, flag, target(adapter), "--force"], capsys,
          rf"{flag} .* the input ADAPTER .*: an output may never be, contain or lie inside an input")
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_correct_help_says_calibrated_refuses_targets_and_restore_once(capsys):
    with pytest.raises(SystemExit):
        main(["correct", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--method calibrated must correct every module and refuses a --targets that leaves one out" in text
    start = text.index("--restore X [")
    restore = text[start:text.index("--select", start)]
    assert restore.count("add beta * D_k, the top-k alignment displacement") == 1, restore
    assert "csulora, calibrated: beta >= 0" in restore and "resta: beta >= 0" in restore
