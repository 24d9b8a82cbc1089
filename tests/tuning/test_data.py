"""tune's validation data in framings (issue 24): the plain and the framed prompts of one split are
two harmful sources; ``--framing`` frames every set without a framing of its own."""

from __future__ import annotations

import pytest

from csulora.errors import OptionError
from csulora.tuning.data import load_tune_data


def test_a_split_plain_and_framed_is_two_sources(tune_data):
    spec = str(tune_data["advbench"])
    loaded = load_tune_data([spec, f"{spec}@aoa"], str(tune_data["task"]), str(tune_data["benign"]))
    data = loaded.data
    assert list(data.harmful) == ["advbench-val", "advbench-val@aoa"]
    assert data.harmful["advbench-val"] == data.harmful["advbench-val@aoa"]  # the same prompts, judged apart
    assert data.framing_of("harmful:advbench-val@aoa").name == "aoa"
    assert data.framing_of("harmful:advbench-val").is_plain and data.framing_of("task").is_plain
    described = loaded.description
    assert described["harmful"]["advbench-val@aoa"] == {"spec": f"{spec}@aoa", "n": 12, "framing": "aoa"}
    assert described["framing"]["name"] == "plain"


def test_the_default_framing_frames_every_set_without_its_own(tune_data):
    spec = str(tune_data["advbench"])
    data = load_tune_data([spec, f"{spec}@plain"], str(tune_data["task"]), str(tune_data["benign"]), "aoa").data
    assert list(data.harmful) == ["advbench-val@aoa", "advbench-val"]
    assert {name: f.name for name, f in data.framings.items()} == {
        "harmful:advbench-val@aoa": "aoa", "task": "aoa", "benign": "aoa"}  # fmt: skip


def test_a_framed_test_split_is_refused_and_an_unknown_framing_is_one_line(tune_data):
    with pytest.raises(OptionError, match="contains a test split"):
        load_tune_data(["advbench:test@aoa"], None, str(tune_data["benign"]))
    with pytest.raises(OptionError, match="unknown framing 'aob'"):
        load_tune_data([str(tune_data["advbench"])], None, str(tune_data["benign"]), "aob")
