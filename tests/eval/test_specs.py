"""Harmful sources given in a framing (``SPEC@FRAMING``, issue 24): named apart, held-out rules kept."""

from __future__ import annotations

import pytest

from csulora.errors import InputError, OptionError
from csulora.eval.specs import check_not_held_out, load_prompts, named_sources, source_name, spec_file


def test_a_framed_source_is_named_apart_from_the_plain_one():
    named = named_sources(["advbench:validation", "advbench:validation@aoa", "airt:val@plain"])
    assert named == {"advbench-validation": "advbench:validation", "advbench-validation@aoa": "advbench:validation@aoa",
                     "airt-val": "airt:val@plain"}  # fmt: skip


def test_the_default_framing_frames_every_source_without_its_own():
    named = named_sources(["advbench:test", "airt:test@plain"], framing="aoa")
    assert named == {"advbench-test@aoa": "advbench:test@aoa", "airt-test": "airt:test@plain"}
    assert named_sources(["advbench:test"], framing="plain") == {"advbench-test": "advbench:test"}


def test_a_framing_file_names_the_source_by_its_name(tmp_path):
    framing = tmp_path / "pirate.json"
    framing.write_text('{"system": "Talk like a pirate."}')
    assert source_name(f"advbench:validation@{framing}") == "advbench-validation@pirate"


def test_a_framed_test_split_is_still_held_out():
    with pytest.raises(OptionError, match="contains a test split"):
        check_not_held_out("advbench:test@aoa")
    with pytest.raises(OptionError, match="overlaps benign:test"):
        check_not_held_out("benign:test@aoa")
    check_not_held_out("advbench:validation@aoa")


def test_an_unknown_framing_in_a_spec_is_one_line():
    with pytest.raises(OptionError, match="unknown framing 'aob': known framings are plain, aoa"):
        named_sources(["advbench:validation@aob"])


def test_prompt_sets_outside_harmful_sources_take_no_suffix(tmp_path):
    with pytest.raises(OptionError, match="--harmful sources only"):
        load_prompts("benign:validation@aoa")
    file = tmp_path / "h.txt"
    file.write_text("one\n")
    assert spec_file(f"{file}@aoa") == file  # what an output must stay apart from
    with pytest.raises(InputError, match="no such prompt file"):
        load_prompts(str(tmp_path / "missing.txt"))
