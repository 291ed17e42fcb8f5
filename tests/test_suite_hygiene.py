"""The test workers' own hygiene: compiled programs are freed between modules."""
import gc

import jax

from recursive_lm.config import DepthPlan, tiny_config
from recursive_lm.decode.engine import Engine
from recursive_lm.nn.model import init_params


def _mappings() -> int:
  with open("/proc/self/maps") as f:
    return sum(1 for _ in f)


def test_clear_caches_unmaps_compiled_programs():
  """conftest's module fixture relies on jax.clear_caches() releasing most JIT
  code mappings of compiled programs (else a long-lived worker reaches
  vm.max_map_count and the next compilation aborts)."""
  jax.clear_caches()
  gc.collect()
  before = _mappings()
  for plan in (DepthPlan.vanilla(2), DepthPlan(0, 2, 2, 0), DepthPlan(1, 1, 3, 1)):
    cfg = tiny_config(plan=plan)
    Engine(cfg, init_params(cfg, seed=0)).generate([[5, 6, 7]], max_new_tokens=3)
  grown = _mappings()
  jax.clear_caches()
  gc.collect()
  after = _mappings()
  assert grown > before + 100, (before, grown)  # compiled code is mapped
  assert after - before < 0.5 * (grown - before), (before, grown, after)
