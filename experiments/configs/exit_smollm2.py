"""Re-export of ``recursive_lm/configs/exit_smollm2.py`` (the config ships with the package).

Kept so existing commands (``--config experiments/configs/exit_smollm2.py:...``) and
``import exit_smollm2`` keep working; edit the packaged file.
"""
import os as _os
import sys as _sys

# This checkout's package, whichever recursive_lm is installed.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
if _ROOT not in _sys.path:
  _sys.path.insert(0, _ROOT)

from recursive_lm.configs import exit_smollm2 as _impl  # noqa: E402  pylint: disable=wrong-import-position

globals().update({k: v for k, v in vars(_impl).items()
                  if not (k.startswith("__") and k.endswith("__"))})
__doc__ = _impl.__doc__
del _impl, _os, _sys, _ROOT
