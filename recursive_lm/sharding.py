"""Device mesh, logical-axis rule presets and parameter/batch shardings.

Parameters carry logical axis names (``recursive_lm.nn.layers``: ``embed``,
``vocab``, ``heads``, ``kv_heads``, ``mlp``, ``loops``, ``lora_rank``);
activations/batches use ``batch`` and ``length``. A *rule preset* maps those
names onto the three mesh axes ``("data", "fsdp", "tensor")``:

* ``data``        -- pure data parallelism: batch over data x fsdp, params replicated.
* ``fsdp``        -- ZeRO-3 style: params sharded along ``embed`` over ``fsdp``.
* ``tensor``      -- Megatron style: heads / kv_heads / mlp / vocab over ``tensor``.
* ``fsdp_tensor`` -- both of the above (2-D parameter sharding).

The batch dimension is always split over ``("data", "fsdp")`` (an fsdp group
processes different examples, like MaxText/T5X); ``tensor`` ranks see the same
examples. Unlisted logical names (``length``, ``loops``, ``lora_rank``) are
replicated.

Recipe (Flax ``lm1b`` / big_vision)::

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    abstract = abstract_params(cfg)                     # boxed ShapeDtypeStructs
    p_sh = param_shardings(abstract, mesh, RULES["fsdp_tensor"])
    params = shard_params(params, p_sh)

Dimensions that a mesh axis does not divide (e.g. the tiny test vocab 97 over
tensor=2, or SmolLM2's kv dim 3 x 64 = 192 over tensor=5) are **replicated along
that dimension** instead of failing inside ``jax.jit``;
``param_shardings(..., strict=True)`` raises instead.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH, LENGTH = "batch", "length"
_BATCH_AXES = ("data", "fsdp")

_COMMON = ((BATCH, _BATCH_AXES), (LENGTH, None), ("loops", None), ("lora_rank", None))
_TENSOR = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor"))

RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "data": _COMMON + (("embed", None), ("vocab", None), ("heads", None),
                       ("kv_heads", None), ("mlp", None)),
    "fsdp": _COMMON + (("embed", "fsdp"), ("vocab", None), ("heads", None),
                       ("kv_heads", None), ("mlp", None)),
    "tensor": _COMMON + (("embed", None),) + _TENSOR,
    "fsdp_tensor": _COMMON + (("embed", "fsdp"),) + _TENSOR,
}
"""Logical-axis rule presets (``(logical_name, mesh_axis | tuple | None)``)."""


class ShardingError(ValueError):
  """A mesh or sharding request cannot be satisfied."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``("data", "fsdp", "tensor")`` mesh in Auto (GSPMD) mode.

  Args:
    data, fsdp, tensor: axis sizes; at most one may be -1 ("all the rest").
    devices: devices to use (default: ``jax.devices()``).

  Raises:
    ShardingError: when the product of axis sizes is not the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = [data, fsdp, tensor]
  if sum(s == -1 for s in shape) > 1:
    raise ShardingError(f"make_mesh: at most one axis may be -1, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ShardingError(f"make_mesh: axis sizes must be positive or -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ShardingError(
          f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): {n} devices are "
          f"not divisible by the fixed axes' product {known}; choose sizes whose "
          f"product divides {n}")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ShardingError(
        f"make_mesh(data={data}, fsdp={fsdp}, tensor={tensor}): product "
        f"{math.prod(shape)} != {n} available devices; pick sizes whose product is "
        f"{n} (or pass data=-1 to use all remaining devices)")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def abstract_params(cfg, seq_len: int = 8) -> Any:
  """Boxed (``nn.LogicallyPartitioned``) ShapeDtypeStruct params of ``Transformer(cfg)``."""
  from recursive_lm.nn.model import Transformer  # local: avoid import cycles
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)
  return variables["params"]


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, strict: bool = False,
             name: str = "") -> P:
  """Drops (replicates) mesh axes of ``spec`` whose size does not divide ``shape``."""
  parts = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for d, (axes, size) in enumerate(zip(parts, shape)):
    k = _axis_size(mesh, axes)
    if size % k:
      if strict:
        raise ShardingError(
            f"{name}: dim {d} of shape {tuple(shape)} (size {size}) is not divisible "
            f"by mesh axes {axes} of size {k}; change the mesh or the rule preset")
      axes = None
    out.append(axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] | str = "fsdp_tensor",
                    strict: bool = False) -> Any:
  """NamedSharding tree (unboxed structure) for boxed abstract params.

  Args:
    abstract_boxed_params: params as returned by ``jax.eval_shape(model.init,
      ...)["params"]`` (leaves ``nn.LogicallyPartitioned`` of ShapeDtypeStruct),
      see ``abstract_params``. Real boxed arrays work too.
    mesh: the device mesh.
    rules: a rule tuple or a ``RULES`` key.
    strict: raise on non-divisible dims instead of replicating them.
  """
  rules = RULES[rules] if isinstance(rules, str) else tuple(rules)
  logical = nn.get_partition_spec(abstract_boxed_params)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
  shapes = nn.meta.unbox(abstract_boxed_params)
  paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
  flat_sh = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: x is None or isinstance(x, NamedSharding))
  if len(flat_sh) != len(paths):
    raise ShardingError("param_shardings: every param must carry logical axis names "
                        "(nn.with_logical_partitioning)")
  out = []
  for (path, leaf), sh in zip(paths, flat_sh):
    spec = P() if sh is None else sh.spec
    out.append(NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh, strict,
                                            jax.tree_util.keystr(path))))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] | str | None = None
                   ) -> NamedSharding:
  """Sharding of a ``[B, T]`` batch array: B over the rules' ``batch`` axes."""
  axes = _BATCH_AXES
  if rules is not None:
    rules = RULES[rules] if isinstance(rules, str) else rules
    axes = dict(rules).get(BATCH, _BATCH_AXES)
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_params(params: Any, shardings: Any) -> Any:
  """Places (unboxed) ``params`` according to a matching tree of shardings."""
  return jax.device_put(nn.meta.unbox(params), shardings)


def sharded_fraction(params: Any) -> float:
  """Fraction of parameter bytes that are *not* fully replicated (for asserts)."""
  tot = shard = 0
  for x in jax.tree_util.tree_leaves(params):
    nbytes = int(np.prod(x.shape)) * x.dtype.itemsize
    tot += nbytes
    if not x.sharding.is_fully_replicated:
      shard += nbytes
  return shard / max(tot, 1)
