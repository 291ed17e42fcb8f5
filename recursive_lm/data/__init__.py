"""Input pipeline: text sources -> packed, batched LM rows (grain, TFDS).

* :mod:`recursive_lm.data.sources` - :func:`make_source` for ``"pydoc"`` (the
  embedded Python-docs corpus), ``"tfds:<name>[/config][:field]"``, and local
  ``.txt`` / ``.jsonl`` / ``.parquet`` files.
* :mod:`recursive_lm.data.pydoc_corpus` - the ``pydoc_corpus`` TFDS builder
  (built TF-free into array_record files; no download).
* :mod:`recursive_lm.data.pipeline` - :func:`make_lm_iterator` (shuffle,
  tokenize, pack with segment ids / positions, batch, shard; checkpointable)
  and :func:`eval_batches`.

``pydoc_corpus`` (which imports tensorflow_datasets, ~0.4 s) is loaded lazily.
"""

from recursive_lm.data.pipeline import (
    BATCH_KEYS,
    PackIterDataset,
    eval_batches,
    iterator_checkpoint_args,
    make_lm_dataset,
    make_lm_iterator,
    make_sharded_lm_iterator,
    plan_data_shards,
    resolve_shard,
    ShardedBatchIterator,
    sharded_eval_batches,
    tokenize_document,
)
from recursive_lm.data.sources import (
    TextSource,
    TfdsTextSource,
    is_validation_key,
    make_source,
)

__all__ = [
    "BATCH_KEYS",
    "PackIterDataset",
    "PydocCorpus",
    "TextSource",
    "TfdsTextSource",
    "build_pydoc_corpus",
    "corpus_stats",
    "eval_batches",
    "is_validation_key",
    "iterator_checkpoint_args",
    "make_lm_dataset",
    "make_lm_iterator",
    "make_sharded_lm_iterator",
    "make_source",
    "plan_data_shards",
    "ShardedBatchIterator",
    "sharded_eval_batches",
    "resolve_shard",
    "tokenize_document",
]

_LAZY = {"PydocCorpus", "build_pydoc_corpus", "corpus_stats"}


def __getattr__(name):
  if name in _LAZY:
    from recursive_lm.data import pydoc_corpus  # pylint: disable=g-import-not-at-top

    return getattr(pydoc_corpus, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
