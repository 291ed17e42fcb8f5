"""Conditional work on the KV cache without copying it.

A ``lax.cond`` / ``lax.switch`` whose branches carry the KV cache makes XLA
copy the cache buffers through the conditional (copy insertion gives every
branch its own output buffer; measured in the optimized HLO: one copy of
every cache layer the branch touches, per decode step, plus one more at the
call site). A ``lax.while_loop`` updates its carry in place, so "run ``fn``
on the cache iff ``pred``" is written as a loop of 0 or 1 trips. The trip
count is a traced integer, so XLA cannot prove the loop runs at most once
and turn it back into a conditional.

* ``when(pred, fn, carry, operands)``: ``fn(carry, *operands)`` if ``pred``
  else ``carry``;
* ``select_branch(index, fns, carry, operands)``: ``fns[index](carry,
  *operands)`` (0/1-trip loops in sequence, exactly one of which runs: a
  copy-free ``lax.switch``).

``fn`` must return a pytree with the structure, shapes and dtypes of
``carry`` (put any branch output in the carry as a placeholder).

**Pass the branch's inputs as ``operands``, not by closure.** XLA's
loop-invariant code motion hoists every computation of a while body that
depends only on loop-invariant values out of the loop, and it does so even
when the loop runs 0 times: a closed-over state ``h`` makes, e.g., the K/V
projections of a KV fill run every step whether or not the branch is taken
(measured: 37 extra weight matmuls per CALM step at batch 1, ~3 ms of a
25 ms step, for fills no row needed). ``operands`` reach ``fn`` through an
``optimization_barrier`` together with the trip counter, which makes them
loop-variant, so nothing that reads them leaves the loop. Cheap invariants
(positions, masks, RoPE tables) may still be closed over and hoisted.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def when(pred, fn: Callable, carry, operands: Sequence = ()):
  """``fn(carry, *operands)`` if ``pred`` (traced bool scalar) else ``carry``,
  in place; ``operands`` are read only inside the branch (module docstring)."""
  trips = jnp.asarray(pred).astype(jnp.int32)
  operands = tuple(operands)

  def body(c):
    i, x = c
    if operands:
      _, ops = jax.lax.optimization_barrier((i, operands))
      return i + 1, fn(x, *ops)
    return i + 1, fn(x)

  _, out = jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), carry))
  return out


def select_branch(index, fns: Sequence[Callable], carry, operands: Sequence = ()):
  """``fns[index](carry, *operands)`` (traced int scalar), in place; ``carry``
  unchanged when ``index`` is outside [0, len(fns))."""
  for i, fn in enumerate(fns):
    carry = when(index == i, fn, carry, operands)
  return carry
