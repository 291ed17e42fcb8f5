"""Re-export of ``recursive_lm/configs/mor_uptrain_smollm2.py`` (the config ships with the package).

Kept so existing commands (``--config experiments/configs/mor_uptrain_smollm2.py:...``) and
``import mor_uptrain_smollm2`` keep working; edit the packaged file.
"""
from recursive_lm.configs import mor_uptrain_smollm2 as _impl

globals().update({k: v for k, v in vars(_impl).items()
                  if not (k.startswith("__") and k.endswith("__"))})
__doc__ = _impl.__doc__
del _impl
