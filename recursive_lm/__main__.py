"""``python -m recursive_lm COMMAND [--flags]``: see ``recursive_lm.cli``."""
from recursive_lm.cli import run

if __name__ == "__main__":
  run()
