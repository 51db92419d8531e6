import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs and run each a few times: LLVM's optimizations cost more compile
# time than they save (about half of the suite's time on 2 cores). Numerics do not change;
# benchmarks keep them.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
# libtpu (the tpu extra) locks a machine-wide file on load; AOT tests in several processes need
# this.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One built-in corpus (tiny settings) shared by every training test."""
    return str(tmp_path_factory.mktemp("corpus"))
