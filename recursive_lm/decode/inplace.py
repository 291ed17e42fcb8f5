"""Conditional work on the KV cache without copying it.

A ``lax.cond`` / ``lax.switch`` whose branches carry the KV cache makes XLA
copy the cache buffers through the conditional (copy insertion gives every
branch its own output buffer; measured in the optimized HLO: one copy of
every cache layer the branch touches, per decode step, plus one more at the
call site). A ``lax.while_loop`` updates its carry in place, so "run ``fn``
on the cache iff ``pred``" is written as a loop of 0 or 1 trips. The trip
count is a traced integer, so XLA cannot prove the loop runs at most once
and turn it back into a conditional.

* ``when(pred, fn, carry)``: ``fn(carry)`` if ``pred`` else ``carry``;
* ``select_branch(index, fns, carry)``: ``fns[index](carry)`` (0/1-trip loops
  in sequence, exactly one of which runs: a copy-free ``lax.switch``).

``fn`` must return a pytree with the structure, shapes and dtypes of
``carry`` (put any branch output in the carry as a placeholder).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def when(pred, fn: Callable, carry):
  """``fn(carry)`` if ``pred`` (traced bool scalar) else ``carry``, in place."""
  trips = jnp.asarray(pred).astype(jnp.int32)

  def body(c):
    i, x = c
    return i + 1, fn(x)

  _, out = jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), carry))
  return out


def select_branch(index, fns: Sequence[Callable], carry):
  """``fns[index](carry)`` (traced int scalar), in place; ``carry`` unchanged
  when ``index`` is outside [0, len(fns))."""
  for i, fn in enumerate(fns):
    carry = when(index == i, fn, carry)
  return carry
