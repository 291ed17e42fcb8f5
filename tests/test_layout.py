"""The package's import layering (read from the source with ``ast``, lazy
imports inside functions included, nothing imported).

* ``nn`` (the model, its MoR block and routers, the KV cache, the
  layer-at-a-time application) sits beneath everything else: it imports only
  ``config`` and ``kernels``.
* No import cycle between top-level units (subpackages such as ``decode`` or
  ``training``, and root modules such as ``api``): e.g. ``training`` imports
  ``mor`` and ``mor`` never imports ``training``.
"""
from __future__ import annotations

import ast
import collections
import pathlib

import recursive_lm

PKG = pathlib.Path(recursive_lm.__file__).parent
NN_MAY_IMPORT = {"config", "kernels"}


def _unit(path: pathlib.Path) -> str:
  """Top-level unit of a source file: its subpackage, or the root module."""
  rel = path.relative_to(PKG)
  return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_units(path: pathlib.Path) -> set[str]:
  """Top-level units of ``recursive_lm`` that a file imports, anywhere in it."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      mods = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      mods = [node.module]
      if node.module == "recursive_lm":  # from recursive_lm import api, __version__
        mods = [f"recursive_lm.{a.name}" for a in node.names
                if (PKG / a.name).is_dir() or (PKG / f"{a.name}.py").is_file()]
    else:
      continue
    for m in mods:
      parts = m.split(".")
      if parts[0] == "recursive_lm" and len(parts) > 1:
        out.add(parts[1])
  return out


def _graph() -> dict[str, set[str]]:
  g = collections.defaultdict(set)
  for f in PKG.rglob("*.py"):
    u = _unit(f)
    g[u] |= _imported_units(f) - {u}
  return g


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of ``g`` as a path [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(u):
    state[u] = 1
    stack.append(u)
    for v in sorted(g.get(u, ())):
      if state.get(v) == 1:
        return stack[stack.index(v):] + [v]
      if v not in state:
        found = visit(v)
        if found:
          return found
    stack.pop()
    state[u] = 2
    return None

  for u in sorted(g):
    if u not in state:
      found = visit(u)
      if found:
        return found
  return None


def test_the_graph_sees_lazy_imports():
  """The checker itself: a function-level import counts, as does
  ``from recursive_lm import <module>``."""
  g = _graph()
  assert "decode" in g["mor"]       # mor.decode builds on decode.engine
  assert "mor" in g["training"]     # trainer: mor.convert, training.mor_step
  assert "api" in g["evaluation"]   # from recursive_lm import api
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_nn_imports_nothing_above_it():
  for f in sorted((PKG / "nn").rglob("*.py")):
    bad = _imported_units(f) - NN_MAY_IMPORT - {"nn"}
    assert not bad, (f"{f.relative_to(PKG)} imports recursive_lm.{sorted(bad)}; nn may "
                     f"import only {sorted(NN_MAY_IMPORT)}: move the needed piece into nn")


def test_no_import_cycle_between_top_level_units():
  cycle = _cycle(_graph())
  assert cycle is None, ("import cycle between recursive_lm units: "
                         + " -> ".join(cycle) + "; move the shared piece beneath both")
