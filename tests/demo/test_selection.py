"""The recommendation: the row that is `csulora tune` with its defaults, or why there is none."""

from __future__ import annotations

import pytest

from csulora.demo.selection import recommendation


def test_recommendation_says_why_none_and_refuses_two():
    sweeps = {"resta": {"knob": "restore", "chosen": 3.0, "why": "no setting qualifies: too unsafe", "recommends": True}}
    rows = [{"name": "resta", "recommended": False}]
    assert recommendation(rows, sweeps) == {"row": None, "why": "no setting qualifies: too unsafe"}
    rows = [{"name": "resta", "recommended": True}]
    assert recommendation(rows, sweeps)["params"] == {"restore": 3.0}
    with pytest.raises(AssertionError):
        recommendation([{"name": "a", "recommended": True}, {"name": "b", "recommended": True}], sweeps)
