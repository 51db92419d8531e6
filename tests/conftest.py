import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the tpu extra) locks a machine-wide file on load; AOT tests in several processes need this.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One built-in corpus (tiny settings) shared by every training test."""
    return str(tmp_path_factory.mktemp("corpus"))
