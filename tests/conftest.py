"""Test setup: CPU with 8 simulated devices, set before JAX is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
  # LLVM's optimisation of the CPU code dominates compile time of these small programs and buys
  # nothing at test sizes: about half the suite's CPU time.
  _flags += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in _flags:
  # XLA:CPU's newer (MLIR) fusion emitters take 2-3x the CPU time of its classic ones to compile
  # the same fused HLO, and buy nothing here: about a third of the suite's time.
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()

# Identical programs compiled by different tests (each run of the trainer builds fresh closures)
# are served from a persistent compilation cache that lives only for this test session. Set through
# the environment so that subprocesses started by tests share it.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sosm-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA without most optimisations (~3x faster compiles), for modules that test behaviour, not
  XLA: `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  import jax  # pylint: disable=import-outside-toplevel
  before = jax.config.values.get("jax_disable_most_optimizations", False)
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)
