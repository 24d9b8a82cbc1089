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
def tiny_tokenizer(tiny_world):
    from csulora.modeling import load_tokenizer

    return load_tokenizer(tiny_world.base)
