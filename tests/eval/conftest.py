"""One tiny world per test session, shared through its on-disk cache."""

import pytest


@pytest.fixture(scope="session")
def tiny_world():
    from csulora.worlds.tiny import shared_tiny_world

    return shared_tiny_world()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_world):
    from csulora.modeling import load_tokenizer

    return load_tokenizer(tiny_world.base)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine they cost 10x."""
    from csulora.worlds.tiny import one_thread

    with one_thread():
        yield
