"""Test setup: 8 fake CPU devices (for sharding tests), deterministic numerics."""
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache in tests (api.load() would otherwise turn it on
# for the whole worker process); tests of the cache set the variable themselves.
os.environ.setdefault("RECURSIVE_LM_COMPILE_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops JAX's compiled programs after each test module. Every XLA:CPU
  executable keeps its JIT code in its own memory mappings; a test worker that
  keeps all of them runs into the kernel's limit on mappings per process
  (vm.max_map_count, 65530) and the next compilation aborts in LLVM
  ("Unable to allocate section memory"; seen as a worker crash in
  test_speculative after ~300 tests, the core dump holding 65531 mappings)."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def fast_compile():
  """XLA optimisations off for one test module: tiny models compile faster.
  Use it with ``pytestmark = pytest.mark.usefixtures("fast_compile")``."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small seeded JSONL corpus (300 documents of 10-60 words) for training tests."""
  import json  # pylint: disable=g-import-not-at-top
  import random  # pylint: disable=g-import-not-at-top
  rng = random.Random(0)
  words = ("the cat sat on a mat while dogs ran in the park and birds sang "
           "songs of joy").split()
  path = tmp_path_factory.mktemp("data") / "docs.jsonl"
  with open(path, "w") as f:
    for _ in range(300):
      n = rng.randint(10, 60)
      f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
  return str(path)
