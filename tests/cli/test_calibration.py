"""``csulora calibrate`` through ``csulora.cli.main`` (in-process): the happy path prints one
summary line; every bad input is one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from csulora.cli import build_parser, main
from csulora.eval.splits import advbench_split
from csulora.eval.tasks import date_task
from csulora.io.calibration_file import load_calibration
from tests.fixtures_tiny import leftovers


@pytest.fixture
def outs(tmp_path) -> Path:
    folder = tmp_path / "outs"
    folder.mkdir()
    return folder


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(p.text for p in advbench_split("align")[:8]) + "\n")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": i["prompt"], "response": i["response"]}) + "\n"
                            for i in date_task("train")[:8]))  # fmt: skip
    return {"harmful": harmful, "task": task}


def argv(world, out: Path, inputs, *extra) -> list[str]:
    """calibrate on the test data; the answer cache is off unless the test gives --answer-cache."""
    cache = [] if "--answer-cache" in map(str, extra) else ["--no-answer-cache"]
    return ["calibrate", str(world.aligned), "-o", str(out), "--task", str(inputs["task"]),
            "--harmful", str(inputs["harmful"]), "--max-new-tokens", "8", "--batch-size", "4",
            "--device", "cpu", *cache, *map(str, extra)]  # fmt: skip


def fails(args, capsys, pattern: str) -> str:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


def assert_nothing_written(outs: Path) -> None:
    assert sorted(p.name for p in outs.iterdir()) == []
    assert leftovers(outs) == []


def test_calibrate_writes_the_statistics_and_says_what_it_did(tiny_world, inputs, outs, capsys):
    out = outs / "calibration.safetensors"
    assert main(argv(tiny_world, out, inputs, "--targets", "v_proj,gate_proj,up_proj")) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(
        rf"wrote {re.escape(str(out))}: 6 modules in 4 Gram groups \(one pass\); harmful 8 prompts, \d+ tokens; "
        r"task 8 examples, \d+ tokens; generation \d+\.\d s, statistics \d+\.\d s; "
        rf"run record {re.escape(str(out))}\.run\.json\n",
        captured.out,
    ), captured.out
    assert "one pass over the tokens" in captured.err
    file = load_calibration(out)
    assert file.group_of("model.layers.1.mlp.up_proj") == "model.layers.1.mlp.gate_proj+up_proj"
    assert file.info["generation"]["max_new_tokens"] == 8
    assert leftovers(outs) == []
    # An existing output is refused without --force (before the model is loaded) ...
    fails(argv(tiny_world, out, inputs), capsys, r"^csulora calibrate: error: .*calibration\.safetensors: file exists \(use --force")
    # ... and replaced with it.
    assert main(argv(tiny_world, out, inputs, "--targets", "o_proj", "--force")) == 0
    assert len(load_calibration(out).modules) == 2
    assert sorted(p.name for p in outs.iterdir()) == ["calibration.safetensors", "calibration.safetensors.run.json"]


def test_a_second_calibration_reads_the_answers_from_the_cache(tiny_world, inputs, outs, tmp_path, capsys):
    cache = tmp_path / "answers"
    assert main(argv(tiny_world, outs / "a.safetensors", inputs, "--targets", "o_proj", "--answer-cache", cache)) == 0
    assert "generation " in capsys.readouterr().out and len(list(cache.glob("*.json"))) == 1
    assert main(argv(tiny_world, outs / "b.safetensors", inputs, "--targets", "down_proj", "--answer-cache", cache)) == 0
    out = capsys.readouterr().out
    assert "answers read from the cache, statistics" in out and "generation" not in out
    assert json.loads((outs / "b.safetensors.run.json").read_text())["answers"]["read_back"] is True
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(argv(tiny_world, outs / "c.safetensors", inputs, "--answer-cache", cache,
                                       "--no-answer-cache"))  # fmt: skip


def test_the_default_answer_length_is_the_shared_constant():
    from csulora.references.calibration import CALIBRATION_MAX_NEW_TOKENS

    args = build_parser().parse_args(["calibrate", "aligned", "-o", "c.safetensors", "--task", "date:train"])
    assert args.max_new_tokens == CALIBRATION_MAX_NEW_TOKENS == 64


def test_outputs_that_cannot_or_may_not_be_written_are_one_line(tiny_world, inputs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(argv(tiny_world, tmp_path / "file" / "c.safetensors", inputs), capsys,
          r"file/c\.safetensors: cannot be written: .*file is not a folder")  # fmt: skip
    fails(argv(tiny_world, Path("/proc/c.safetensors"), inputs), capsys, r"cannot be written")
    fails(argv(tiny_world, Path(tiny_world.aligned) / "model.safetensors", inputs, "--force"), capsys,
          r"lies inside the input ALIGNED .*an output may never be, contain or lie inside an input")  # fmt: skip
    fails(argv(tiny_world, inputs["task"], inputs, "--force"), capsys, r"is the input --task")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"--task": "date:validation"}, r"--task date:validation: the split tune selects on"),
        ({"--task": "date:test"}, r"--task date:test: a test split"),
        ({"--harmful": "advbench:validation"}, r"is also in advbench:validation as advbench-\d+"),
        ({"--harmful": "airt:val"}, r"is also in airt:val as airt-"),
        ({"--targets": "nothing_here"}, r"--targets nothing_here matches no linear layer"),
        ({"--max-new-tokens": "0"}, r"--max-new-tokens must be >= 1"),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(tiny_world, inputs, outs, capsys, change, pattern):
    args = argv(tiny_world, outs / "calibration.safetensors", inputs)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    fails(args, capsys, pattern)
    assert_nothing_written(outs)


def test_a_task_line_without_a_response_names_the_file_and_line(tiny_world, inputs, outs, capsys):
    inputs["task"].write_text('{"prompt": "p", "response": "r"}\n{"prompt": "q", "answer": "r"}\n')
    fails(argv(tiny_world, outs / "c.safetensors", inputs), capsys, r"task\.jsonl:2: missing or non-string field 'response'")
    assert_nothing_written(outs)


def test_task_or_update_is_required(tmp_path, capsys):
    fails(["calibrate", "aligned", "-o", str(tmp_path / "c.safetensors")], capsys,
          r"give --task FILE\.jsonl\|date:train \(the aligned model's statistics\), or --update UPDATE --pairs")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_missing_or_pickled_model_is_refused(tmp_path, inputs, outs, capsys):
    missing = SimpleNamespace(aligned=tmp_path / "no-model")
    fails(argv(missing, outs / "c.safetensors", inputs), capsys, r"no-model: no such checkpoint folder")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    fails(argv(SimpleNamespace(aligned=pickled), outs / "c.safetensors", inputs), capsys,
          r"only pickled weights found \(pytorch_model\.bin\); csulora reads safetensors only")  # fmt: skip
    assert_nothing_written(outs)


# -- --update: Antidote's statistics of the fine-tuned model ----------------------------------------
def update_argv(world, pairs, out: Path, *extra) -> list[str]:
    return ["calibrate", str(world.aligned), "--update", str(world.attacked), "--pairs", str(pairs), "-o", str(out),
            "--batch-size", "4", "--device", "cpu", *map(str, extra)]  # fmt: skip


def test_update_mode_writes_antidotes_statistics_and_correct_reads_them(tiny_world, update_pairs, outs, capsys):
    from safetensors.torch import load_file

    from csulora.methods.antidote import pruned_per_row

    stats = outs / "update.safetensors"
    assert main(update_argv(tiny_world, update_pairs, stats)) == 0
    assert re.fullmatch(
        rf"wrote {re.escape(str(stats))} \(antidote's --update-statistics\): 14 modules in 8 Gram groups \(one pass\) "
        r"of ALIGNED with the adapter attached and merged; 8 pairs, \d+ tokens; statistics \d+\.\d s; "
        rf"run record {re.escape(str(stats))}\.run\.json\n",
        capsys.readouterr().out,
    )
    corrected = outs / "corrected"
    assert main(["correct", str(tiny_world.attacked), "-o", str(corrected), "--method", "antidote",
                 "--update-statistics", str(stats)]) == 0  # fmt: skip
    capsys.readouterr()
    config = json.loads((corrected / "adapter_config.json").read_text())
    assert config["r"] == json.loads((Path(tiny_world.attacked) / "adapter_config.json").read_text())["r"] == 8
    written = load_file(str(corrected / "adapter_model.safetensors"))
    given = load_file(str(Path(tiny_world.attacked) / "adapter_model.safetensors"))
    assert written.keys() == given.keys() and all(written[k].shape == given[k].shape for k in given)
    for key, factor in written.items():  # the published default prunes 10% of every row of both factors
        assert bool(((factor == 0).sum(1) >= pruned_per_row(factor.shape[1], 0.1)).all()), key
        assert not torch.equal(factor, given[key]), key
    report = json.loads((corrected / "csulora_report.json").read_text())
    assert report["sources"]["update_statistics"] == str(stats)


def test_statistics_files_are_refused_under_the_wrong_flag_or_for_another_update(
    tiny_world, update_pairs, inputs, outs, tmp_path, capsys
):
    import shutil

    from safetensors.torch import load_file, save_file

    stats, aligned_stats = outs / "update.safetensors", outs / "aligned.safetensors"
    assert main(update_argv(tiny_world, update_pairs, stats)) == 0
    assert main(argv(tiny_world, aligned_stats, inputs, "--targets", "v_proj")) == 0
    capsys.readouterr()
    attacked, out = str(tiny_world.attacked), str(outs / "corrected")
    fails(["correct", attacked, "-o", out, "--method", "antidote", "--update-statistics", str(aligned_stats)], capsys,
          r"--update-statistics .*aligned\.safetensors: it holds the aligned model's statistics \(read by --calibration\), "
          r"not Antidote's statistics of the fine-tuned model; write those with "
          r"`csulora calibrate ALIGNED --update UPDATE --pairs FILE`$")  # fmt: skip
    for method, extra in (("calibrated", []), ("safedelta", ["--aligned", str(tiny_world.aligned)])):
        fails(["correct", attacked, "-o", out, "--method", method, "--calibration", str(stats), *extra], capsys,
              r"--calibration .*update\.safetensors: it holds Antidote's statistics of the fine-tuned model \(read by "
              r"--update-statistics\), not the aligned model's statistics; write those with "
              r"`csulora calibrate ALIGNED --task FILE`$")  # fmt: skip
    # Another adapter of the same model: the same modules and shapes, other weights.
    other = Path(shutil.copytree(tiny_world.attacked, tmp_path / "other"))
    factors = load_file(str(other / "adapter_model.safetensors"))
    save_file({k: v * 1.5 if "lora_B" in k else v for k, v in factors.items()}, str(other / "adapter_model.safetensors"))
    fails(["correct", str(other), "-o", out, "--method", "antidote", "--update-statistics", str(stats)], capsys,
          r"update\.safetensors: statistics were measured on another adapter than .*other \(weights or config differ\); "
          r"rerun `csulora calibrate ALIGNED --update .*other --pairs FILE`$")  # fmt: skip
    # The same adapter on another aligned model (here: another chat template).
    aligned = Path(shutil.copytree(tiny_world.aligned, tmp_path / "aligned"))
    (aligned / "chat_template.jinja").write_text((aligned / "chat_template.jinja").read_text() + " ")
    fails(["correct", attacked, "-o", out, "--method", "antidote", "--update-statistics", str(stats),
           "--aligned", str(aligned)], capsys, r"update\.safetensors: statistics were measured on another model than")  # fmt: skip
    assert sorted(p.name for p in outs.iterdir()) == sorted(
        ["update.safetensors", "update.safetensors.run.json", "aligned.safetensors", "aligned.safetensors.run.json"]
    )


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--task", "date:train"], r"--task does not apply with --update: the fine-tuned model reads --pairs as given"),
        (["--harmful", "requests"], r"--harmful does not apply with --update"),
        (["--no-answer-cache"], r"--no-answer-cache does not apply with --update"),
        (["--answer-cache", "answers"], r"--answer-cache does not apply with --update"),
        (["--max-new-tokens", "8"], r"--max-new-tokens does not apply with --update: .*\(no task pass, nothing generated\)$"),
        (["--framing", "aoa"], r"--framing does not apply with --update"),
    ],
)
def test_update_mode_refuses_the_other_modes_flags(tiny_world, update_pairs, outs, capsys, extra, pattern):
    fails(update_argv(tiny_world, update_pairs, outs / "u.safetensors", *extra), capsys, pattern)
    assert_nothing_written(outs)


def test_pairs_and_update_go_together(tiny_world, update_pairs, inputs, outs, capsys):
    fails(argv(tiny_world, outs / "c.safetensors", inputs, "--pairs", update_pairs), capsys,
          r"--pairs applies with --update UPDATE")  # fmt: skip
    fails(["calibrate", str(tiny_world.aligned), "--update", str(tiny_world.attacked), "-o", str(outs / "u.safetensors")],
          capsys, r"--update needs --pairs FILE\.jsonl")  # fmt: skip
    assert_nothing_written(outs)


def test_the_help_says_update_writes_antidotes_statistics(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "With --update UPDATE --pairs FILE.jsonl instead: write Antidote's statistics" in help_text
    assert "correct/tune --method antidote read it as --update-statistics" in help_text
