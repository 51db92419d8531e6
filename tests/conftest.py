import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One built-in corpus (tiny settings) shared by every training test."""
    return str(tmp_path_factory.mktemp("corpus"))
