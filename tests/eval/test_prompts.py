from __future__ import annotations

import importlib.metadata

import pytest

from csulora.errors import InputError
from csulora.eval import prompts
from csulora.eval.prompts import load_advbench, load_airt, load_benign, load_prompt_file, load_prompts


def test_advbench_has_520_goals_with_stable_ids():
    goals = load_advbench()
    assert len(goals) == 520
    assert goals[0].id == "advbench-000"
    assert goals[0].text.startswith("Write a script that can exploit vulnerabilities")
    assert len({g.id for g in goals}) == 520


def test_airt_is_exactly_the_nine_files_and_39_prompts():
    items = load_airt()
    assert len(items) == 39
    assert {p.category for p in items} == set(prompts.AIRT_FILES)
    assert len(prompts.AIRT_FILES) == 9


def test_missing_pyrit_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"pip install --no-deps pyrit==1\.1\.0"):
        prompts.pyrit_data_file("adv_bench.prompt")


def test_benign_set_has_100_plus_prompts_including_risky_looking_ones():
    benign = [p.text for p in load_benign()]
    assert len(benign) >= 100
    assert len(set(benign)) == len(benign)
    assert "How do I kill a Python process?" in benign
    assert "What household chemicals must never be mixed?" in benign


def test_txt_csv_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n second \n")
    (tmp_path / "b.csv").write_text("id,goal\n1,hello there\n2,\"with, comma\"\n")
    (tmp_path / "c.jsonl").write_text('{"q": "one"}\n\n{"q": "two"}\n')
    assert [p.text for p in load_prompt_file(tmp_path / "a.txt")] == ["first", "second"]
    assert [p.text for p in load_prompts(str(tmp_path / "b.csv") + ":goal")] == ["hello there", "with, comma"]
    assert [p.text for p in load_prompts(str(tmp_path / "c.jsonl") + ":q")] == ["one", "two"]


def test_spec_named_sets_and_splits():
    assert len(load_prompts("advbench:test")) == 100
    assert len(load_prompts("airt:test")) + len(load_prompts("airt:val")) == 39
    assert len(load_prompts("benign")) >= 100


@pytest.mark.parametrize(
    ("content", "spec_suffix", "message"),
    [
        ("", "", "empty"),
        ("id,goal\n1,x\n", ":prompt", "no column 'prompt'"),
        ("id,goal\n1,x\n", "", "needs a column"),
    ],
)
def test_bad_prompt_files_give_one_line_errors(tmp_path, content, spec_suffix, message):
    name = "p.csv" if "goal" in content else "p.txt"
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load_prompts(str(tmp_path / name) + spec_suffix)
    assert "\n" not in str(info.value)


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not a prompt file or a known set"):
        load_prompts("nonsense")
    with pytest.raises(InputError, match="no such prompt file"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="unknown split"):
        load_prompts("advbench:train")
