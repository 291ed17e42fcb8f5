"""Trained exit modules for a frozen model (issue 12).

* ``modules``: the per-exit maps (affine translator, low-rank MLP) from the
  residual state after layer e to the final-norm input, and the vocabulary
  shortlist draft head;
* ``artifact``: ``ExitSet`` save/load beside the model (safetensors + json with
  the base model's identity and fingerprint);
* ``features``: training data (corpus + the model's own continuations) and the
  cached per-layer features;
* ``train``: closed-form affine fit, KD + CE training, held-out agreement,
  the meta classifier;
* ``speculative``: lossless self-speculation (and FREE-style exiting) that
  drafts through an exit module.
"""
