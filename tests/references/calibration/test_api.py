"""``csulora.references.calibration.calibrate``: what the file says, its run record, byte-identical
reruns, outputs checked before any work, hub ids (docs/design.md §5c; issues 21, 23)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import pytest

from csulora.errors import InputError, OptionError
from csulora.io.calibration_file import load_calibration
from csulora.io.fingerprint import model_fingerprint
from csulora.references.calibration import CALIBRATION_MAX_NEW_TOKENS, calibrate, run_record_path
from csulora.version import __version__
from tests.fixtures_tiny import leftovers
from tests.io.test_hub import use_fake_hub
from tests.references.calibration.helpers import L0, L1, MAX_NEW, N_PROMPTS, assert_nothing_written, run


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- what the file and its run record say ---------------------------------------------------------
def test_metadata_says_what_the_statistics_were_computed_from(calibrated, tiny_world, data):
    file = load_calibration(calibrated.path)
    info = file.info
    assert info == calibrated.info
    fingerprint = model_fingerprint(tiny_world.aligned)
    assert info["model_fingerprint"] == fingerprint
    file.check_model(fingerprint["digest"], tiny_world.aligned)  # what correct will check
    assert info["aligned"] == str(Path(tiny_world.aligned).resolve())
    assert info["targets"] is None and info["modules"] == 14 and info["groups"] == 8
    assert info["generation"] == {"max_new_tokens": MAX_NEW, "greedy": True, "chat_template": True, "batch_size": 4}
    assert (info["device"], info["dtype"], info["products"], info["accumulation"]) == (
        "cpu", "float32", "float32", "float64",
    )  # fmt: skip
    texts = data.harmful.read_text().splitlines()
    digest = hashlib.sha256("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts).encode()).hexdigest()
    assert info["harmful"]["sha256"] == digest
    assert info["harmful"]["prompts"] == N_PROMPTS and info["harmful"]["specs"] == [str(data.harmful)]
    assert info["harmful"]["tokens"] == calibrated.harmful_tokens > N_PROMPTS * 10
    pairs = [json.loads(line) for line in data.task.read_text().splitlines()]
    task_digest = hashlib.sha256(
        "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs).encode()
    ).hexdigest()
    assert info["task"] == {"spec": str(data.task), "examples": N_PROMPTS, "sha256": task_digest,
                            "tokens": calibrated.task_tokens}  # fmt: skip
    assert info["csulora_version"] == __version__
    # Nothing that differs between identical runs: that is the run record's (issue 23).
    assert not {"seconds", "memory_budget_bytes", "passes", "passes_resume_from_cached_hidden_states"} & info.keys()


def test_the_run_record_holds_the_timings_and_the_machine(calibrated):
    record_file = run_record_path(calibrated.path)
    assert calibrated.record_path == record_file and record_file.name == "calibration.safetensors.run.json"
    record = json.loads(record_file.read_text())
    assert record == calibrated.run
    assert record["statistics_file"] == "calibration.safetensors"
    assert record["passes"] == 1 and record["memory_budget_bytes"] > 0
    assert record["passes_resume_from_cached_hidden_states"] is False  # one pass: nothing to resume
    assert set(record["seconds"]) == {"fingerprint_and_load", "generation", "statistics"}
    assert all(v >= 0 for v in record["seconds"].values())
    assert record["answers"] == {"file": None, "status": "off", "read_back": False,
                                 "generated_tokens": record["answers"]["generated_tokens"]}  # fmt: skip
    assert record["machine"]["device"] == "cpu" and record["machine"]["threads"] >= 1


def test_a_rerun_with_force_writes_the_same_statistics_file(tiny_world, data, outs, tmp_path):
    """Byte for byte, even when the rerun reads the answers the first run cached, under
    another memory budget: only the run record differs."""
    out = outs / "calibration.safetensors"
    first = run(tiny_world, out, data, answer_cache=tmp_path / "cache", targets="q_proj,down_proj")
    first_bytes, first_record = out.read_bytes(), run_record_path(out).read_text()
    again = run(tiny_world, out, data, answer_cache=tmp_path / "cache", targets="q_proj,down_proj", force=True,
                memory_budget_gb=1e-6)  # fmt: skip
    assert again.answers_read_back and not first.answers_read_back and again.passes > first.passes
    assert out.read_bytes() == first_bytes
    assert run_record_path(out).read_text() != first_record
    assert sorted(p.name for p in outs.iterdir()) == ["calibration.safetensors", "calibration.safetensors.run.json"]


def test_the_run_record_can_be_left_out(tiny_world, data, outs):
    result = run(tiny_world, outs / "c.safetensors", data, targets="o_proj", run_record_file=False)
    assert result.record_path is None and sorted(p.name for p in outs.iterdir()) == ["c.safetensors"]


def test_one_default_length_for_the_aligned_answers():
    """calibrate and tune --calibration-task share CALIBRATION_MAX_NEW_TOKENS (issue 23)."""
    assert CALIBRATION_MAX_NEW_TOKENS == 64
    assert inspect.signature(calibrate).parameters["max_new_tokens"].default == CALIBRATION_MAX_NEW_TOKENS


def test_targets_restrict_the_modules(tiny_world, data, outs):
    result = run(tiny_world, outs / "some.safetensors", data, targets="q_proj,down_proj")
    file = load_calibration(result.path)
    assert sorted(file.modules) == [f"{L0}.mlp.down_proj", f"{L0}.self_attn.q_proj",
                                    f"{L1}.mlp.down_proj", f"{L1}.self_attn.q_proj"]  # fmt: skip
    assert file.group_of(f"{L0}.self_attn.q_proj") == f"{L0}.self_attn.q_proj"  # k/v not targeted: no sharing
    assert file.info["targets"] == ["q_proj", "down_proj"]
    with pytest.raises(OptionError, match="--targets lm_head matches no linear layer"):
        run(tiny_world, outs / "none.safetensors", data, targets="lm_head")


# -- outputs: checked before any work ----------------------------------------------------------------
def test_an_existing_output_is_refused_before_any_model_is_loaded(tmp_path, data):
    existing = tmp_path / "calibration.safetensors"
    existing.write_bytes(b"old")
    # The model folder does not even exist: the output check comes first.
    with pytest.raises(InputError, match="calibration.safetensors: file exists \\(use --force to replace it\\)"):
        calibrate(tmp_path / "no-model", existing, task=data.task, harmful=[str(data.harmful)], progress=False)
    assert existing.read_bytes() == b"old"
    existing.unlink()
    run_record_path(existing).write_text("{}")  # a run record without its file is an output too
    with pytest.raises(InputError, match="calibration.safetensors.run.json: file exists"):
        calibrate(tmp_path / "no-model", existing, task=data.task, harmful=[str(data.harmful)], progress=False)


def test_force_replaces_an_existing_output(tiny_world, data, outs, calibrated):
    out = outs / "calibration.safetensors"
    out.write_bytes(b"old")
    result = run(tiny_world, out, data, force=True, targets="o_proj")
    assert load_calibration(result.path).modules.keys() == {f"{L0}.self_attn.o_proj", f"{L1}.self_attn.o_proj"}
    assert leftovers(outs) == []


@pytest.mark.parametrize("where", ["parent is a file", "proc", "read-only folder"])
def test_an_unwritable_output_is_one_line_before_any_work(tmp_path, data, where):
    if where == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub" / "calibration.safetensors"
    elif where == "proc":
        out = Path("/proc/calibration.safetensors")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "calibration.safetensors"
    # No such model: were anything read or computed first, the error would be about it.
    with pytest.raises(InputError, match=r"calibration\.safetensors: cannot be written: ") as info:
        calibrate(tmp_path / "no-model", out, task=data.task, harmful=[str(data.harmful)], progress=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ro") == (["file"] if where == "parent is a file" else [])


def test_no_folder_is_left_behind_when_a_later_check_fails(tmp_path, data, tiny_world):
    out = tmp_path / "new" / "deeper" / "c.safetensors"
    with pytest.raises(OptionError):
        run(tiny_world, out, data, targets="lm_head")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "case", ["inside ALIGNED", "onto the task file", "onto a harmful file", "symlink into ALIGNED", "answer cache"]
)
def test_an_output_may_never_be_or_lie_inside_an_input(tiny_world, data, tmp_path, case):
    aligned = Path(tiny_world.aligned)
    cache = aligned / "answers" if case == "answer cache" else False
    if case == "answer cache":  # the cache is written too: never inside ALIGNED
        out = tmp_path / "calibration.safetensors"
    elif case == "inside ALIGNED":
        out = aligned / "model.safetensors"
    elif case == "onto the task file":
        out = data.task
    elif case == "onto a harmful file":
        out = data.harmful
    else:
        (tmp_path / "link").symlink_to(aligned)
        out = tmp_path / "link" / "calibration.safetensors"
    before = {**tree_bytes(aligned), "task": data.task.read_bytes(), "harmful": data.harmful.read_bytes()}
    with pytest.raises(InputError, match=r"an output may never be, contain or lie inside an input") as info:
        run(tiny_world, out, data, force=True, answer_cache=cache)
    assert "\n" not in str(info.value)
    after = {**tree_bytes(aligned), "task": data.task.read_bytes(), "harmful": data.harmful.read_bytes()}
    assert after == before and leftovers(aligned) == []


def test_aligned_may_be_a_hub_id(tiny_world, data, outs, tmp_path, monkeypatch, calibrated):
    use_fake_hub(monkeypatch, tmp_path / "hub", {"tiny-org/aligned": Path(tiny_world.aligned)})
    result = calibrate("tiny-org/aligned", outs / "hub.safetensors", task=data.task, harmful=[str(data.harmful)],
                       max_new_tokens=MAX_NEW, batch_size=4, device="cpu", progress=False, answer_cache=False)  # fmt: skip
    assert result.info["aligned"] == "tiny-org/aligned"
    assert result.info["model_fingerprint"] == calibrated.info["model_fingerprint"]
    hub, local = load_calibration(result.path), load_calibration(calibrated.path)
    assert hub.module(f"{L1}.mlp.down_proj").harmful.matrix.equal(local.module(f"{L1}.mlp.down_proj").harmful.matrix)
    with pytest.raises(InputError, match="ALIGNED tiny-org/missing .*HF_HUB_OFFLINE"):
        calibrate("tiny-org/missing", outs / "missing.safetensors", task=data.task, progress=False)
    assert_nothing_written_but(outs, {"hub.safetensors", "hub.safetensors.run.json"})


def assert_nothing_written_but(folder: Path, names: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == names
    assert leftovers(folder) == []


def test_an_interrupt_leaves_nothing_behind(tiny_world, data, outs, monkeypatch):
    import csulora.references.calibration.api as api_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api_module, "statistics_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_world, outs / "c.safetensors", data)
    assert_nothing_written(outs)


# -- framings (issue 24) --------------------------------------------------------------------------
def test_the_metadata_records_the_framing_the_prompts_were_given_in(tiny_world, data, outs, calibrated):
    from csulora.training.framing import PLAIN, load_framing

    assert calibrated.info["framing"] == PLAIN.key()
    framed = run(tiny_world, outs / "aoa.safetensors", data, framing="aoa")
    assert load_calibration(framed.path).info["framing"] == framed.info["framing"] == load_framing("aoa").key()
    # the system message and prefix are read by the statistics pass: more tokens on both sets
    assert framed.harmful_tokens > calibrated.harmful_tokens and framed.task_tokens > calibrated.task_tokens
    with pytest.raises(OptionError, match="unknown framing 'aob'"):
        run(tiny_world, outs / "never.safetensors", data, framing="aob")
    assert not (outs / "never.safetensors").exists()
