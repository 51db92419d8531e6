import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compile many small programs and run each a few times: LLVM's optimizations cost more compile
# time than they save (about half of the suite's time on 2 cores). Numerics do not change;
# benchmarks keep them.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
# One persistent compilation cache per test session, fresh each run (nothing carries over between
# runs) and removed at exit: the suite compiles the same tiny-model programs in many modules
# (jax.clear_caches() below drops only the in-memory cache), in the `python -m ...` subprocesses
# and in the notebook kernels, which inherit the variables. Programs that compile in under half a
# second are not worth a file.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _jit_cache = tempfile.mkdtemp(prefix="moejax-test-jit-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _jit_cache
    atexit.register(shutil.rmtree, _jit_cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# libtpu (the tpu extra) locks a machine-wide file on load; AOT tests in several processes need
# this.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """After each test module, drop JAX's compiled programs (and the modules' own, gone with their
    fixtures). Every XLA:CPU executable holds memory maps: one module can leave ~12,000, and the
    whole suite in one process would pass Linux's vm.max_map_count (65,530), at which the compiler
    crashes (a segmentation fault in backend_compile)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One built-in corpus (tiny settings) shared by every training test."""
    return str(tmp_path_factory.mktemp("corpus"))
