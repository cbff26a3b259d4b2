"""Eight simulated CPU devices for every test; this must run before JAX is imported."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the tests check numbers, not speed, on programs so small that XLA's optimisation passes cost far more
# than running them (the suite's compile time roughly halves); the processes the tests start inherit it
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# one compilation cache for the session and the processes it starts: the same programs (a run, its
# kill and its resumption; the same toy model in many engines) are compiled once
_CACHE = None  # the session's own cache, removed at the end (one the caller set up is left alone)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdbp-jax-test-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")



def pytest_sessionfinish(session, exitstatus):
    """Remove the session's compilation cache (one the caller set up is left alone)."""
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
