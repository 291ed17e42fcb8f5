"""Moved to ``recursive_lm.nn.unrolled`` (the layer-at-a-time model application
that decoding and exit training share); re-exported here for existing imports."""
from recursive_lm.nn.unrolled import *  # noqa: F401,F403  pylint: disable=wildcard-import
from recursive_lm.nn.unrolled import (  # noqa: F401  pylint: disable=unused-import
    _KVAttn, _KVProjection, _apply_unit, _layer_params, _loop_lora, _read_cache,
    _write_cache)
