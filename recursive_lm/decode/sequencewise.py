"""Sequence-wise (static) batching with per-token early exit: the baseline for
``decode.depthwise.DepthwiseBatcher``.

``SequenceBatcher`` is ``decode.loopwise.LoopwiseServer(lockstep=True)``:
requests are served in static batches of ``slots``; the whole batch is
prefilled, then each token of the batch runs the loops of the shared block in
lockstep. A row that exits early (same ``ExitPolicy`` or ``ForcedDepth`` and
the same state-copying KV fill as depth-wise batching) waits, so the batch
moves to the next token only when its deepest row is done (loops are skipped
only when *every* row has exited), and the next batch starts only when every
request of this one has finished. That is the "bubble" depth-wise batching
removes; tokens are the same per request as depth-wise batching's, so the two
can be timed against each other.

Example::

    base = SequenceBatcher(cfg, params, slots=32, exit=ExitPolicy("softmax_max", 0.9))
    out = base.generate(prompts, max_new_tokens=128)   # a decode.serving.BatchOutput
"""
from __future__ import annotations

from recursive_lm.config import ModelConfig
from recursive_lm.decode.loopwise import LoopwiseServer


class SequenceBatcher(LoopwiseServer):
  """Static batches of ``slots`` requests; per-row exits wait for the batch.

  Same constructor and ``generate`` as ``DepthwiseBatcher`` (cfg, params from
  ``recursive_lm.api.load(...)`` or ``recursive_lm.export.load_model(...)``).
  """

  def __init__(self, cfg: ModelConfig, params, slots: int = 8, exit=None,
               eos_id: int | None = None, pad_id: int | None = None, **serving):
    super().__init__(cfg, params, slots=slots, exit=exit, lockstep=True, eos_id=eos_id,
                     pad_id=pad_id, **serving)
