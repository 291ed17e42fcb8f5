"""Re-export of ``recursive_lm/configs/uptrain_smollm2.py`` (the config ships with the package; edit
that file), kept so ``--config experiments/configs/uptrain_smollm2.py:...`` and ``import uptrain_smollm2`` work."""
from recursive_lm.configs.uptrain_smollm2 import *  # noqa: F401,F403  pylint: disable=wildcard-import
from recursive_lm.configs.uptrain_smollm2 import __doc__  # noqa: F401
