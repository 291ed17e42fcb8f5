from recursive_lm.cli import run

run()
