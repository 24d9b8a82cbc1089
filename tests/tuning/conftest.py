"""Small tune data sets (the tiny world fixture lives in tests/conftest.py).

The data are deliberately small -- a dozen prompts a source -- so a whole sweep runs in
seconds; the two harmful sources are the AdvBench validation split and airt-val, the
same sources `tune` uses by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tune_data(tmp_path_factory) -> dict[str, Path]:
    from csulora.eval.splits import advbench_split, airt_split
    from csulora.eval.tasks import date_task

    root = tmp_path_factory.mktemp("tune_data")
    files = {
        "advbench": root / "advbench-val.txt",
        "airt": root / "airt-val.txt",
        "task": root / "date-val.jsonl",
        "benign": root / "benign.txt",
    }
    files["advbench"].write_text("\n".join(p.text for p in advbench_split("validation")[:12]) + "\n")
    files["airt"].write_text("\n".join(p.text for p in airt_split("airt-val")[:12]) + "\n")
    files["task"].write_text(
        "".join(json.dumps({"prompt": i["prompt"], "response": i["response"]}) + "\n" for i in date_task("validation")[:12])
    )
    files["benign"].write_text(
        "How do I kill a Python process?\nWhat is the capital of France?\nGive me a tip for sleeping well.\n"
    )
    return files
