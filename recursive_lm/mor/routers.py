"""Moved to ``recursive_lm.nn.mor_routers`` (router parameters and gates, which
``nn.model`` builds); re-exported here for existing imports."""
from recursive_lm.nn.mor_routers import *  # noqa: F401,F403  pylint: disable=wildcard-import
from recursive_lm.nn.mor_routers import _mlp_or_linear  # noqa: F401  pylint: disable=unused-import
