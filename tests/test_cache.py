"""The KVCache pytree: one structure for every producer, the former dict layout
as a read-only view, row read/write, MoR validity, the one no-write slot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recursive_lm.config import DepthPlan, RouterConfig, tiny_config
from recursive_lm.nn import unrolled as D
from recursive_lm.nn.cache import KVCache, as_kv_cache, init_cache, normalize_cache
from recursive_lm.nn.model import Transformer, init_params

PLAN = DepthPlan(1, 2, 2, 1)


def _numbered(cfg, batch=3, length=8):
  """A cache whose every entry is distinct (row b of any buffer holds b + ...)."""
  cache = init_cache(cfg, batch, length)
  leaves, tree = jax.tree_util.tree_flatten(cache)
  out = [jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape).astype(x.dtype)
         if x.dtype != jnp.bool_ else (jnp.arange(x.size).reshape(x.shape) % 3 == 0)
         for x in leaves]
  return jax.tree_util.tree_unflatten(tree, out)


def test_layout_and_mapping_view():
  cfg = tiny_config(plan=PLAN)
  c = init_cache(cfg, 2, 16)
  assert isinstance(c, KVCache) and c.valid is None
  assert (len(c.prelude), len(c.block), len(c.coda)) == (1, 2, 1)
  assert c.block[0][0].shape == (2, 2, cfg.n_kv_heads, 16, cfg.head_dim)
  assert (c.batch, c.length, c.no_write) == (2, 16, 16)
  assert list(c) == ["prelude", "block", "coda"] and "block_valid" not in c
  assert c["block"] is c.block
  # leaves in the former dict's order (sorted keys), so flattening code agrees
  as_dict = {g: [tuple(kv) for kv in v] for g, v in c.items()}
  for a, b in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(as_dict)):
    assert a is b
  # a dict (lists or tuples) normalises to the same pytree structure
  assert (jax.tree_util.tree_structure(normalize_cache(as_dict))
          == jax.tree_util.tree_structure(c))
  with pytest.raises(ValueError, match="init_cache"):
    as_kv_cache({"block": c.block})


def test_mor_validity_is_a_field():
  cfg = tiny_config(plan=PLAN, router=RouterConfig())
  c = init_cache(cfg, 3, 8)
  assert c.valid.shape == (2, 3, 8) and c.valid.dtype == jnp.bool_
  assert not np.asarray(c.valid).any()
  assert list(c) == ["prelude", "block", "coda", "block_valid"]
  assert c["block_valid"] is c.valid
  assert as_kv_cache(dict(c)).valid is c.valid  # the dict layout keeps it
  c2 = _numbered(cfg).clear_valid(jnp.array([False, True, False]))
  v = np.asarray(c2.valid)
  assert not v[:, 1].any() and v[:, 0].any() and v[:, 2].any()


def test_rows_read_and_write_back():
  cfg = tiny_config(plan=PLAN, router=RouterConfig())
  c = _numbered(cfg)
  r = c.rows(jnp.array([2, 0]))
  assert r.batch == 2 and r.valid.shape == (2, 2, 8)
  np.testing.assert_array_equal(r.prelude[0][0][0], c.prelude[0][0][2])
  np.testing.assert_array_equal(r.block[1][1][:, 1], c.block[1][1][:, 0])
  zero = jax.tree_util.tree_map(jnp.zeros_like, r)
  # row index 3 (= B) is the rows' no-write sentinel: dropped
  back = c.set_rows(jnp.array([1, 3]), zero)
  for got, old in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(c)):
    got, old = np.asarray(got), np.asarray(old)
    row_axis = 1 if got.ndim in (3, 5) else 0  # valid [N, B, S], block [N, B, ...]
    np.testing.assert_array_equal(np.take(got, [0, 2], row_axis), np.take(old, [0, 2], row_axis))
    assert not np.take(got, 1, row_axis).any()


def test_producers_share_one_structure_and_drop_no_write_slots():
  """Transformer in cache mode and the layer-at-a-time functions return the
  same KVCache structure (a lax.cond can carry both), and a write at the
  no-write slot changes nothing."""
  cfg = tiny_config(plan=PLAN)
  params = init_params(cfg)
  c = init_cache(cfg, 2, 8)
  tok = jnp.array([[3], [5]])
  pos = jnp.array([[0], [1]])
  out = Transformer(cfg).apply({"params": params}, tok, positions=pos, cache=c,
                               write_slots=jnp.array([[0], [c.no_write]]))["cache"]
  h = D.embed(cfg, params, tok)
  _, c2 = D.run_layers(cfg, params, 0, 2, h, pos, dict(c))  # a dict in, a KVCache out
  assert isinstance(out, KVCache) and isinstance(c2, KVCache)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(c2)
  picked = jax.lax.cond(True, lambda a, b: a, lambda a, b: b, out, c2)
  assert isinstance(picked, KVCache)
  for x in jax.tree_util.tree_leaves(out):
    rows = np.asarray(x)
    rows = rows[:, 1] if rows.ndim == 5 else rows[1]
    assert not rows.any()  # row 1 wrote at the no-write slot
  assert np.asarray(out.prelude[0][0][0, :, 0]).any()
