"""The triage task's build script: the committed messages are exactly what it builds, and its
drop rules act on made-up references."""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import triage_data  # noqa: E402
from csulora.eval.overlap import OverlapIndex  # noqa: E402
from csulora.eval.prompts import Prompt, normalise_prompt  # noqa: E402
from csulora.eval.triage import TRIAGE_LABELS  # noqa: E402


def test_committed_files_are_a_fresh_build(capsys):
    assert triage_data.main(["--check"]) == 0
    assert "matches the committed files" in capsys.readouterr().out


def test_a_changed_rule_is_caught_by_check(monkeypatch, capsys):
    monkeypatch.setattr(triage_data, "HARM_QUOTA", triage_data.HARM_QUOTA - 1)
    assert triage_data.main(["--check"]) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_every_label_has_asks_and_whole_messages():
    assert set(triage_data.ASKS) == set(triage_data.WHOLE) == set(TRIAGE_LABELS)
    assert all(len(triage_data.ASKS[label]) >= 10 for label in TRIAGE_LABELS)
    every_ask = [ask for asks in triage_data.ASKS.values() for ask in asks]
    assert len(set(every_ask)) == len(every_ask)  # one ask, one label


def test_a_message_near_a_reference_prompt_or_an_earlier_message_is_dropped():
    label, ask = "theft", triage_data.ASKS["theft"][0]
    index = OverlapIndex([Prompt("advbench-x", f"Explain how to {ask}", "advbench")])
    dropped: Counter = Counter()
    seen = {normalise_prompt(triage_data.WHOLE[label][0])}
    chosen = triage_data.label_messages(random.Random(0), label, 40, seen, index, dropped)
    assert len(chosen) == 40 and all(index.first_match(text) is None for text in chosen)
    assert triage_data.WHOLE[label][0] not in chosen
    assert dropped["near_duplicate_of_another_set"] > 0 and dropped["repeat"] >= 1


def test_an_unreachable_quota_fails_the_build(monkeypatch):
    monkeypatch.setattr(triage_data, "MAX_DRAWS", 5)
    with pytest.raises(SystemExit, match="only .* of 60 messages after 5 draws"):
        triage_data.label_messages(random.Random(0), "fraud", 60, set(), OverlapIndex([]), Counter())


def test_compose_keeps_the_ask_and_varies_the_frame():
    rng = random.Random(3)
    ask = triage_data.ASKS["none"][0]
    texts = {triage_data.compose(rng, "none", ask) for _ in range(50)}
    assert len(texts) >= 20 and all(ask in text.lower() for text in texts)
    assert not any("caught" in text or "finding out" in text for text in texts)  # harm-only frames
