"""decode/inplace.py: 0/1-trip loops as copy-free conditionals, and their
operands kept inside the loop (no loop-invariant hoisting of untaken work)."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from recursive_lm.decode.inplace import select_branch, when


def _loop_body_computations(hlo: str) -> set[str]:
  """Every computation a while body calls (transitively), the bodies included."""
  calls, comp = {}, None
  for line in hlo.split("\n"):
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      comp = "ENTRY" if head.group(1) else head.group(2)
      calls.setdefault(comp, set())
      continue
    for name in re.findall(r"(?:calls|body|to_apply)=%?([\w.\-]+)", line):
      calls[comp].add(name)
  todo = {b for b in re.findall(r"body=%?([\w.\-]+)", hlo)}
  seen = set()
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo |= calls.get(c, set())
  return seen


def _computations_matching(hlo: str, pattern: str) -> list[str]:
  """Names of the computations with an instruction matching ``pattern``."""
  out, comp = [], None
  for line in hlo.split("\n"):
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      comp = "ENTRY" if head.group(1) else head.group(2)
      continue
    if re.search(pattern, line):
      out.append(comp)
  return out


def test_when_and_select_branch_values():
  x = jnp.arange(4.0)
  assert np.allclose(when(jnp.bool_(True), lambda c, y: c + y, x, (x,)), 2 * x)
  assert np.allclose(when(jnp.bool_(False), lambda c, y: c + y, x, (x,)), x)
  assert np.allclose(when(jnp.bool_(True), lambda c: c * 3, x), 3 * x)
  fns = [lambda c, y: c + y, lambda c, y: c - y, lambda c, y: c * y]
  for i, want in enumerate([2 * x, 0 * x, x * x]):
    assert np.allclose(select_branch(jnp.int32(i), fns, x, (x,)), want)
  assert np.allclose(select_branch(jnp.int32(7), fns, x, (x,)), x)


def test_operands_are_not_hoisted_out_of_the_loop():
  """A matmul on an operand stays in the 0/1-trip loop's body; closed over,
  XLA hoists it out of the loop, so it would run even when not taken."""
  w = jnp.ones((64, 64), jnp.float32)

  def by_operand(pred, acc, h):
    return when(pred, lambda c, h_: c + jnp.tanh(h_ @ w), acc, (h,))

  def by_closure(pred, acc, h):
    return when(pred, lambda c: c + jnp.tanh(h @ w), acc)

  args = (jnp.bool_(False), jnp.zeros((8, 64)), jnp.ones((8, 64)))
  hlo = jax.jit(by_operand).lower(*args).compile().as_text()
  dots = _computations_matching(hlo, r"\bdot\(|matmul")
  assert dots, "no matmul in the compiled HLO"
  bodies = _loop_body_computations(hlo)
  assert all(c in bodies for c in dots), f"matmul outside the loop: {dots}, bodies {bodies}"
  assert np.allclose(jax.jit(by_operand)(*args), 0.0)
  assert np.allclose(jax.jit(by_closure)(jnp.bool_(True), *args[1:]),
                     jax.jit(by_operand)(jnp.bool_(True), *args[1:]))
