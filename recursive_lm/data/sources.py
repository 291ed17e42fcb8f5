"""Random-access sources of text documents (``str``) for the input pipeline.

:func:`make_source` turns a short spec string into an object with ``len()``
and ``source[i] -> str`` that ``grain.MapDataset.source`` accepts:

* ``"pydoc"`` (the default; also ``None``): the embedded Python-docs corpus
  (TFDS builder :class:`~recursive_lm.data.pydoc_corpus.PydocCorpus`, built
  into ``data_dir`` on first use in ~0.5 s, then cached).
* ``"tfds:<name>[/config][:version][:field]"``: any *prepared* TFDS dataset,
  read through ``tfds.data_source`` (array_record files; no TensorFlow, no
  download).  ``field`` defaults to ``text``; ``version`` looks like
  ``1.0.0``.
* ``path.txt``: one document per block of lines separated by one or more blank
  lines (paragraphs).
* ``path.jsonl[:field]``: one JSON object per line; ``field`` (default
  ``text``) holds the document.
* ``path.parquet[:column]``: a string column (default ``text``).

Splits.  TFDS specs pass ``split`` straight to TFDS (so slicing such as
``"train[:1%]"`` works).  Local files have no splits of their own: ``"train"``
and ``"validation"`` are a deterministic ~95% / ~5% partition by a hash of the
document text (identical documents land on the same side), and ``"all"`` (or
``None``) is every document.  Empty documents are dropped.  Local files are
read into memory; for corpora that do not fit, prepare a TFDS dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "LOCAL_SPLITS",
    "VALIDATION_FRACTION",
    "TextSource",
    "TfdsTextSource",
    "is_validation_key",
    "make_source",
]

LOCAL_SPLITS = ("train", "validation", "all")
#: Fraction of documents held out as ``validation`` (pydoc and local files).
VALIDATION_FRACTION = 0.05
_LOCAL_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_VERSION = re.compile(r"^(\d+\.\d+\.\d+|\*)$")
_SPEC_HELP = (
    "Supported specs: 'pydoc', 'tfds:<name>[/config][:field]', 'path.txt', "
    "'path.jsonl[:field]', 'path.parquet[:column]'."
)


class TextSource(Sequence):
  """An in-memory, random-access list of documents."""

  def __init__(self, documents: Sequence[str], name: str):
    self._documents = list(documents)
    self.name = name

  def __len__(self) -> int:
    return len(self._documents)

  def __getitem__(self, index):
    return self._documents[index]

  def __repr__(self) -> str:
    return f"TextSource({self.name!r}, {len(self)} documents)"


class TfdsTextSource(Sequence):
  """Wraps a TFDS data source; returns one decoded ``str`` field per record."""

  def __init__(self, data_source: Any, field: str, name: str):
    self._source = data_source
    self.field = field
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  @staticmethod
  def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self._decode(self._source[index][self.field])

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    if hasattr(self._source, "__getitems__"):
      records = self._source.__getitems__(list(indices))
    else:
      records = [self._source[i] for i in indices]
    return [self._decode(r[self.field]) for r in records]

  def __repr__(self) -> str:
    return f"TfdsTextSource({self.name!r}, field={self.field!r}, {len(self)} documents)"


def make_source(spec: str | None = "pydoc", split: str | None = "train",
                data_dir: str | os.PathLike[str] | None = None):
  """Returns a random-access source of ``str`` documents (see module doc).

  Args:
    spec: which data; see the module docstring.  None means ``"pydoc"``.
    split: TFDS split (``"train"``, ``"validation"``, ``"test[:10%]"``...) or,
      for local files, one of ``"train"``, ``"validation"``, ``"all"``/None.
    data_dir: TFDS data directory for ``pydoc`` and ``tfds:`` specs (None:
      ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Raises:
    FileNotFoundError: a local file does not exist.
    KeyError: the requested field / column is missing (lists those found).
    ValueError: unknown spec or scheme, bad split, or no documents.
  """
  spec = "pydoc" if spec is None else str(spec).strip()
  if spec == "pydoc":
    return _pydoc_source(split or "train", data_dir)
  if spec.startswith("tfds:"):
    return _tfds_source(spec[len("tfds:"):], split or "train", data_dir)
  path, field = _split_path_field(spec)
  if path is None:
    scheme = spec.split(":", 1)[0] if ":" in spec else None
    if scheme and not os.path.exists(spec):
      raise ValueError(f"Unknown data scheme {scheme!r} in spec {spec!r}. "
                       + _SPEC_HELP)
    raise ValueError(
        f"Unsupported data spec {spec!r}: not 'pydoc', not 'tfds:...', and "
        f"not a file ending in {', '.join(_LOCAL_EXTENSIONS)}. " + _SPEC_HELP)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"Data file {path!r} (from spec {spec!r}) does not exist. Check the "
        "path, or use 'pydoc' for the built-in corpus. " + _SPEC_HELP)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".txt":
    if field is not None:
      raise ValueError(f"Spec {spec!r}: .txt files take no ':field' suffix.")
    docs = _read_txt(path)
  elif ext == ".jsonl":
    docs = _read_jsonl(path, field or "text")
  else:
    docs = _read_parquet(path, field or "text")
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise ValueError(f"Data file {path!r} contains no non-empty documents.")
  docs = _local_split(docs, split, spec)
  return TextSource(docs, name=f"{spec}[{split or 'all'}]")


# ----------------------------------------------------------------------------
# TFDS-backed sources.


def _pydoc_source(split: str, data_dir):
  from recursive_lm.data import pydoc_corpus  # pylint: disable=g-import-not-at-top

  builder = pydoc_corpus.build_pydoc_corpus(data_dir)
  source = _open_split(builder, split, "pydoc")
  return TfdsTextSource(source, "text", name=f"pydoc[{split}]")


def _open_split(builder, split: str, name: str):
  try:
    source = builder.as_data_source(split)
  except NotImplementedError as e:
    raise ValueError(
        f"TFDS dataset {name!r} is not stored as array_record, which random "
        "access needs (no TensorFlow here). Re-prepare it with `tfds build "
        "<name> --file_format=array_record`.") from e
  except (KeyError, ValueError) as e:
    available = sorted(builder.info.splits.keys())
    raise ValueError(
        f"TFDS dataset {name!r} has no split {split!r} ({e}). Available "
        f"splits: {available}.") from e
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty.")
  return source


def _tfds_source(rest: str, split: str, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  parts = rest.split(":")
  name, field, version = parts[0], "text", None
  extra = parts[1:]
  if extra and _VERSION.match(extra[0]):
    version = extra.pop(0)
  if extra:
    field = extra.pop(0)
  if not name or extra or not field:
    raise ValueError(f"Bad TFDS spec 'tfds:{rest}'. Expected "
                     "'tfds:<name>[/config][:version][:field]'.")
  full_name = f"{name}:{version}" if version else name
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    builder = tfds.builder(full_name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"Cannot open TFDS dataset {full_name!r} in data_dir "
        f"{data_dir or '(TFDS default)'}: {type(e).__name__}: "
        f"{(str(e).splitlines() or [''])[0]} Nothing is "
        "downloaded at run time: prepare it first (e.g. `tfds build "
        f"{name} --file_format=array_record --data_dir=...`) on a machine "
        "with network access.") from e
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS dataset {full_name!r} is not prepared in {builder.data_dir}. "
        "Nothing is downloaded at run time: prepare it first with `tfds build "
        f"{name} --file_format=array_record --data_dir=...`.")
  source = _open_split(builder, split, full_name)
  features = getattr(builder.info, "features", None)
  keys = sorted(features.keys()) if hasattr(features, "keys") else None
  if keys is not None and field not in keys:
    raise KeyError(
        f"TFDS dataset {full_name!r} has no feature {field!r}; features "
        f"found: {keys}. Pick one with 'tfds:{name}:<feature>'.")
  return TfdsTextSource(source, field, name=f"tfds:{full_name}[{split}]")


# ----------------------------------------------------------------------------
# Local files.


def _split_path_field(spec: str) -> tuple[str | None, str | None]:
  """'x.jsonl:body' -> ('x.jsonl', 'body'); 'x.txt' -> ('x.txt', None)."""
  lowered = spec.lower()
  for ext in _LOCAL_EXTENSIONS:
    if lowered.endswith(ext):
      return spec, None
    marker = ext + ":"
    idx = lowered.rfind(marker)
    if idx > 0 and ":" not in spec[idx + len(marker):]:
      return spec[: idx + len(ext)], spec[idx + len(marker):] or None
  return None, None


def _read_txt(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
  return [b.strip("\n") for b in blocks]


def _read_jsonl(path: str, field: str) -> list[str]:
  docs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e}).") from e
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object per line, "
                         f"got {type(row).__name__}.")
      if field not in row:
        raise KeyError(
            f"{path}:{lineno}: field {field!r} not found; fields found: "
            f"{sorted(row)}. Use '{path}:<field>' to pick one.")
      value = row[field]
      if value is None:
        continue
      if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, "
                         f"got {type(value).__name__}.")
      docs.append(value)
  return docs


def _read_parquet(path: str, column: str) -> list[str]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  names = pq.read_schema(path).names
  if column not in names:
    raise KeyError(
        f"{path}: column {column!r} not found; columns found: {names}. Use "
        f"'{path}:<column>' to pick one.")
  values = pq.read_table(path, columns=[column]).column(column).to_pylist()
  docs = []
  for i, value in enumerate(values):
    if value is None:
      continue
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    if not isinstance(value, str):
      raise ValueError(f"{path}: column {column!r} must hold strings; row {i} "
                       f"is {type(value).__name__}.")
    docs.append(value)
  return docs


def is_validation_key(key: str, fraction: float = VALIDATION_FRACTION) -> bool:
  """Deterministic hold-out rule: True for ~``fraction`` of keys (sha256)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 10_000 < round(fraction * 10_000)


def _local_split(docs: list[str], split: str | None, spec: str) -> list[str]:
  if split in (None, "all"):
    return docs
  if split not in ("train", "validation"):
    raise ValueError(f"Split {split!r} is not available for local file "
                     f"{spec!r}; use one of {LOCAL_SPLITS}.")
  want = split == "validation"
  chosen = [d for d in docs if is_validation_key(d) == want]
  if not chosen:
    raise ValueError(
        f"Split {split!r} of {spec!r} is empty ({len(docs)} documents, ~5% "
        "held out by hash for 'validation'). Add documents or use split='all'.")
  return chosen
