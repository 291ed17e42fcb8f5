"""Embedded default corpus: the Python standard library's own documentation.

Every Python installation ships its documentation in two forms that need no
download: ``pydoc_data.topics.topics`` (the language-reference topics that
``help('assert')`` prints) and the docstrings of the standard-library modules.
This module turns them into a small text corpus (on CPython 3.11: 194
documents, ~1.5 M characters) and exposes it as a regular TFDS dataset,
``pydoc_corpus``.

Documents
  * ``topic/<name>``  - one pydoc topic (e.g. ``topic/assert``).
  * ``module/<name>`` - one module's collected docs: the module docstring and
    the docstrings (with signatures) of its public classes, their methods, and
    its public functions.  Modules come from the fixed, sorted list
    :data:`STDLIB_MODULES`; a module that cannot be imported on this Python
    build (e.g. ``sqlite3`` compiled out) is skipped.

Splits
  ``validation`` holds a deterministic ~5% of documents, chosen by a hash of
  the document key (:func:`is_validation_key`); ``train`` holds the rest, so no
  document is in both.

TensorFlow is not needed.  ``tensorflow-datasets`` (4.9.x) writes
``file_format='array_record'`` datasets with its vendored ``tf.train.Example``
protos and reads them back through ``tfds.data_source`` / ``as_data_source``
with its NumPy example parser; TF is only lazily imported by ``as_dataset``
(tf.data), which we never call.  The builder is registered with TFDS under the
name ``pydoc_corpus`` when this module is imported; a prepared directory can
also be opened without importing it (``tfds.data_source('pydoc_corpus',
data_dir=...)`` then uses TFDS's read-only builder built from the files).

Docstrings differ slightly between Python versions, so the builder has one
config per Python minor version (``pydoc_corpus/py311`` etc.).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Iterator

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

from recursive_lm.data.sources import VALIDATION_FRACTION, is_validation_key

__all__ = [
    "STDLIB_MODULES",
    "VALIDATION_FRACTION",
    "PydocCorpus",
    "build_pydoc_corpus",
    "corpus_documents",
    "corpus_stats",
    "is_validation_key",
    "module_document",
]

#: Pure-Python (or always-built) standard-library modules whose docs form the
#: ``module/*`` documents.  Importing all of them takes ~0.1 s and has no side
#: effects.  Modules deprecated for removal (uu, xdrlib, cgi, ...) are avoided.
STDLIB_MODULES: tuple[str, ...] = tuple(sorted("""
    abc argparse ast asyncio base64 bisect calendar cmd codecs collections
    collections.abc colorsys concurrent.futures configparser contextlib copy
    csv dataclasses datetime decimal difflib dis email enum filecmp fnmatch
    fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq
    hmac html html.parser http http.client imaplib inspect io ipaddress
    itertools json keyword linecache locale logging logging.handlers lzma
    mailbox mimetypes netrc numbers operator optparse os os.path pathlib
    pickle pkgutil platform plistlib poplib pprint queue quopri random re
    reprlib sched secrets selectors shelve shlex shutil smtplib socket
    socketserver sqlite3 statistics string stringprep struct subprocess
    sysconfig tarfile tempfile textwrap threading timeit token tokenize
    tomllib trace traceback tracemalloc types typing unicodedata unittest
    urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom
    xml.etree.ElementTree zipfile zipimport zoneinfo
""".split()))

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean(doc: str | None) -> str:
  return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _signature(obj) -> str:
  try:
    return str(inspect.signature(obj))
  except (TypeError, ValueError):
    return "(...)"


def _own_doc(obj) -> str:
  """The object's own docstring (not inherited from a base class)."""
  if inspect.isclass(obj):
    return _clean(obj.__dict__.get("__doc__"))
  return _clean(getattr(obj, "__doc__", None))


def _block(header: str, doc: str, indent: str) -> str:
  body = textwrap.indent(doc, indent + "    ") if doc else ""
  return f"{indent}{header}\n{body}".rstrip() + "\n"


def _public_names(module) -> list[str]:
  names = getattr(module, "__all__", None)
  if names is None:
    names = [n for n in vars(module) if not n.startswith("_")]
  return sorted(set(n for n in names if isinstance(n, str)))


def _belongs(obj, module) -> bool:
  owner = getattr(obj, "__module__", None) or ""
  if hasattr(module, "__all__"):
    return True  # Explicitly exported (may be defined in a submodule / C).
  name = module.__name__
  return owner == name or owner.startswith(name + ".")


def module_document(name: str) -> str | None:
  """Collected docs of one module, or None if it cannot be imported."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      module = importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except
    return None
  parts = [f"Module {name}\n{'=' * (7 + len(name))}\n", _own_doc(module) + "\n"]
  for attr in _public_names(module):
    obj = getattr(module, attr, None)
    if inspect.ismodule(obj) or not _belongs(obj, module):
      continue
    if inspect.isclass(obj):
      parts.append("\n" + _block(f"class {name}.{attr}{_signature(obj)}",
                                 _own_doc(obj), ""))
      for mname, member in vars(obj).items():
        if mname.startswith("_") and mname != "__init__":
          continue
        if isinstance(member, (classmethod, staticmethod)):
          member = member.__func__
        if isinstance(member, property):
          doc = _own_doc(member)
          if doc:
            parts.append("\n" + _block(f"property {attr}.{mname}", doc,
                                        "    "))
        elif callable(member):
          doc = _own_doc(member)
          if doc:
            parts.append("\n" + _block(
                f"method {attr}.{mname}{_signature(member)}", doc, "    "))
    elif callable(obj):
      doc = _own_doc(obj)
      if doc:
        parts.append("\n" + _block(f"function {name}.{attr}{_signature(obj)}",
                                   doc, ""))
  text = _ADDRESS.sub("", "".join(parts))
  return "\n".join(line.rstrip() for line in text.strip().splitlines()) + "\n"


def corpus_documents() -> Iterator[tuple[str, str]]:
  """Yields ``(key, text)`` for every document, in a fixed order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  for name in sorted(topics.topics):
    text = topics.topics[name].strip()
    if text:
      yield f"topic/{name}", text + "\n"
  for name in STDLIB_MODULES:
    text = module_document(name)
    if text and text.strip():
      yield f"module/{name}", text


def _python_config_name() -> str:
  return f"py{sys.version_info.major}{sys.version_info.minor}"


class PydocCorpus(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for the Python stdlib documentation corpus (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "pydoc topics + stdlib module docstrings."}
  # TFDS derives `code_path` via `importlib_resources`, which tfds 4.9.10 only
  # declares as a dependency for Python < 3.9 (ModuleNotFoundError on 3.11 for
  # builders that live in a package).  Pin it to this file instead; it is only
  # used to look for a (non-existent) `checksums.tsv` next to the builder.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name=_python_config_name(),
          description=f"Docs of Python {sys.version.split()[0]}.",
      )
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Python standard-library documentation: pydoc_data topics and "
            "module/class/function docstrings. One document per topic or "
            "module; ~5% of documents held out (hash of key) as validation."),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "key": tfds.features.Text(),
        }),
        homepage="https://docs.python.org/3/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {
        "train": self._generate_examples(validation=False),
        "validation": self._generate_examples(validation=True),
    }

  def _generate_examples(self, validation: bool):
    for key, text in corpus_documents():
      if is_validation_key(key) == validation:
        yield key, {"text": text, "key": key}


@contextlib.contextmanager
def _quiet_tfds(quiet: bool):
  """Temporarily hides TFDS progress bars, and sends what TFDS prints while
  it prepares ("Downloading and preparing dataset ...") to stderr: stdout is
  the program's output (e.g. ``recursive-lm eval --json``), which a first
  build on a fresh machine must not corrupt."""
  # pylint: disable=protected-access
  from tensorflow_datasets.core.utils import tqdm_utils

  previous = tqdm_utils._active
  if quiet:
    tqdm_utils._active = False
  try:
    with contextlib.redirect_stdout(sys.stderr):
      yield
  finally:
    tqdm_utils._active = previous


def build_pydoc_corpus(
    data_dir: str | os.PathLike[str] | None = None, *, quiet: bool = True
) -> PydocCorpus:
  """Prepares (once) and returns the ``pydoc_corpus`` builder.

  Args:
    data_dir: TFDS data directory; None -> TFDS default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).  The dataset lands in
      ``<data_dir>/pydoc_corpus/py3XX/1.0.0``.
    quiet: hide the TFDS progress bars.

  Returns:
    The prepared builder; read with ``builder.as_data_source('train')``.
    Building takes ~1 s; later calls find the files and return at once.
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = PydocCorpus(data_dir=data_dir, file_format="array_record")
  # (Checking the file first avoids a TFDS warning about a missing variant.)
  if (builder.data_path / "dataset_info.json").exists() and (
      builder.is_prepared()):
    return builder
  try:
    with _quiet_tfds(quiet):
      builder.download_and_prepare()
  except Exception:  # pylint: disable=broad-except
    # Another process may have finished the same build concurrently.
    builder = PydocCorpus(data_dir=data_dir, file_format="array_record")
    if not (builder.data_path / "dataset_info.json").exists():
      raise
  splits = builder.info.splits
  logging.info("pydoc_corpus prepared in %s: %s", builder.data_path,
               {k: splits[k].num_examples for k in splits.keys()})
  return builder


def corpus_stats(
    data_dir: str | os.PathLike[str] | None = None, encode=None
) -> dict[str, dict[str, int]]:
  """Per split: number of documents, characters (and tokens if ``encode``)."""
  builder = build_pydoc_corpus(data_dir)
  stats = {}
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    texts = [source[i]["text"].decode("utf-8") for i in range(len(source))]
    entry = {"documents": len(texts), "characters": sum(map(len, texts))}
    if encode is not None:
      entry["tokens"] = sum(len(encode(t)) for t in texts)
    stats[split] = entry
  return stats
