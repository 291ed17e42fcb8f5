"""Moved to ``recursive_lm.nn.mor_block`` (the model's routed block lives beneath
``nn.model``, which builds it); re-exported here for existing imports."""
from recursive_lm.nn.mor_block import *  # noqa: F401,F403  pylint: disable=wildcard-import
from recursive_lm.nn.mor_block import _rows  # noqa: F401  pylint: disable=unused-import
