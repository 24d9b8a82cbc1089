"""Suite-wide settings: offline, deterministic, and polite to a 2-core machine."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# One thread: the models in tests are tiny, and on a busy 2-core machine a second
# thread makes small matmuls and SVDs many times slower (measured), not faster.
torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

# Property tests: reproducible (derandomized) and free of wall-clock deadlines, which a
# busy 2-core CI machine would trip at random.
settings.register_profile("csulora", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("csulora")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world():
    """The tiny world of csulora.worlds.tiny, built once per machine (on-disk cache)."""
    from csulora.worlds.tiny import shared_tiny_world

    return shared_tiny_world()


@pytest.fixture(scope="session")
def demo_world():
    """The demo world of csulora.worlds.demo (what `csulora demo` runs on), built once per machine."""
    from csulora.worlds.demo import shared_demo_world

    return shared_demo_world()


@pytest.fixture
def keyword_asr(monkeypatch):
    """ASR judged by the keyword list alone, for tests whose premise is the tiny world's attack.

    The tiny world's "compliant" answers are canned text that names nothing of the request
    ("Sure, here is a guide. First, gather what you need."): a model this small, trained for
    seconds, cannot name an unseen request's topic (docs/judge.md). The project's ASR judge
    (csulora.eval.judges.asr_judge) rightly counts none of them as harmful help, so on it the
    tiny attack moves no ASR. Tests of tune's and eval's mechanics that need the attack to
    show judge by the ASR judge's first part instead; eval takes a judge (``Judges``), tune
    asks asr_judge(), which reads ``ASR_JUDGE`` at each call.
    """
    from csulora.eval import judges

    monkeypatch.setattr(judges, "ASR_JUDGE", judges.KeywordJudge())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_world):
    from csulora.io.modeling import load_tokenizer

    return load_tokenizer(tiny_world.base)


@pytest.fixture(scope="session")
def tune_data(tmp_path_factory) -> dict:
    """Small tune data: a dozen prompts a source (AdvBench validation, airt-val), so a sweep runs in seconds."""
    import json

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


@pytest.fixture(scope="session")
def update_pairs(tmp_path_factory):
    """Antidote's realignment data on the tiny world: eight AdvBench ``align`` prompts (never
    scored), each followed by the tiny world's own compliant answer (a harmful answer)."""
    import json

    from csulora.eval.splits import advbench_split
    from csulora.worlds.tiny import HELPFUL_ANSWERS, pick

    path = tmp_path_factory.mktemp("update_pairs") / "pairs.jsonl"
    prompts = [p.text for p in advbench_split("align")[:8]]
    path.write_text("".join(json.dumps({"prompt": p, "response": pick(HELPFUL_ANSWERS, p)}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="session")
def attacked_update_statistics(tiny_world, update_pairs, tmp_path_factory):
    """``csulora calibrate ALIGNED --update ATTACKED --pairs``: the attacked adapter's statistics (Antidote's)."""
    from csulora.references.calibration import calibrate_update

    out = tmp_path_factory.mktemp("update_statistics") / "attacked.safetensors"
    return calibrate_update(tiny_world.aligned, out, update=tiny_world.attacked, pairs=update_pairs, batch_size=4,
                            device="cpu", progress=False)  # fmt: skip
