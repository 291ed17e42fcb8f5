"""Named experiment variants: ``"file.py:key=value,key=value"`` over typed defaults.

Every ``experiments/configs/*.py`` declares ``VARIANTS = {key: (default, type)}``
and parses its argument with :func:`parse_variants`.
"""
from __future__ import annotations

from typing import Any, Mapping


def parse_variants(arg: str | None, variants: Mapping[str, tuple[Any, type]],
                   example: str) -> dict:
  """``"loops=2,rank=0"`` -> {key: typed value} over the defaults, plus ``"_set"``
  (the keys given, in order). ``none`` sets a key whose default is None to None;
  ints accept ``1e3``.

  Raises:
    ValueError: malformed item, unknown key or a value of the wrong type, with
      the fix in the message.
  """
  out: dict = {k: d for k, (d, _) in variants.items()}
  out["_set"] = []
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config variant {item!r} is not key=value; write e.g. "
                       f"'{example}'. Keys: {sorted(variants)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in variants:
      raise ValueError(f"unknown config variant key {key!r} in {arg!r}; valid keys: "
                       f"{sorted(variants)}")
    typ = variants[key][1]
    try:
      if value.lower() == "none" and variants[key][0] is None:
        out[key] = None
      elif typ is int:
        f = float(value)
        if f != int(f):
          raise ValueError(value)
        out[key] = int(f)
      else:
        out[key] = typ(value)
    except ValueError:
      raise ValueError(f"config variant {key}={value!r}: expected "
                       f"{typ.__name__}") from None
    out["_set"].append(key)
  return out
