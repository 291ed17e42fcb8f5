"""The command framework: one absl ``FlagValues`` per subcommand, one-line errors.

Every subcommand defines its flags on its own ``flags.FlagValues``, so
``recursive-lm generate --help`` lists only generate's flags and a flag of
another subcommand is rejected. User errors (``UserError``, bad flag values,
files that are not models, ...) print one line ``recursive-lm CMD: error: ...``
and exit with status 2; ``--debug`` prints the traceback as well.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
import time
import traceback
from typing import Callable, Sequence

from absl import flags

PROG = "recursive-lm"
USAGE_EXIT = 2


class UserError(Exception):
  """A problem with the user's input; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  summary: str                      # one line for ``recursive-lm --help``
  define: Callable[[flags.FlagValues], None]
  run: Callable[[flags.FlagValues], int | None]
  description: str = ""             # more text for ``recursive-lm NAME --help``
  prepare_argv: Callable[[list[str]], list[str]] | None = None


def define_common(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool("debug", False, "Print the full traceback of errors.", flag_values=fv)
  flags.DEFINE_bool("compile_cache", True,
                    "Keep compiled programs in JAX's persistent compilation cache "
                    "(~/.cache/recursive_lm/jax; env RECURSIVE_LM_COMPILE_CACHE=0 or a "
                    "folder). --nocompile_cache turns it off.", flag_values=fv)
  flags.DEFINE_bool("verbose", False, "INFO-level logs (JAX, trainer).", flag_values=fv)


def flag_values(cmd: Command) -> flags.FlagValues:
  fv = flags.FlagValues()
  cmd.define(fv)
  define_common(fv)
  return fv


def validator(fv: flags.FlagValues, name: str, check: Callable, message: str) -> None:
  """``check(value)`` must hold when the flag is set (None passes)."""
  flags.register_validator(name, lambda v: v is None or check(v), message=message,
                           flag_values=fv)


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text or type(e).__name__


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# -- help ---------------------------------------------------------------------------
def _flag_line(f) -> str:
  kind = "" if f.flag_type() == "bool" else f"=<{f.flag_type()}>"
  text = f.help
  values = getattr(f.parser, "enum_values", None)
  if values:
    kind = f"=<{'|'.join(values)}>"
    text = text.split(">: ", 1)[-1]
  default = f.default_as_str if f.default is not None else None
  bits = [f"  --{f.name}{kind}"]
  if default not in (None, "''", "'None'"):
    text += f" (default: {default})"
  wrapped = textwrap.fill(text, 88, initial_indent="      ", subsequent_indent="      ")
  return bits[0] + "\n" + wrapped


def command_help(cmd: Command, fv: flags.FlagValues) -> str:
  common = {"debug", "compile_cache", "verbose"}
  own = sorted({f.name: f for f in fv._flags().values()}.values(), key=lambda f: f.name)  # pylint: disable=protected-access
  lines = [f"usage: {PROG} {cmd.name} [flags]", "", cmd.summary]
  if cmd.description:
    lines += ["", textwrap.dedent(cmd.description).strip()]
  lines += ["", "flags:"]
  lines += [_flag_line(f) for f in own if f.name not in common]
  lines += ["", "common flags:"]
  lines += [_flag_line(f) for f in own if f.name in common]
  return "\n".join(lines)


def main_help(commands: Sequence[Command]) -> str:
  w = max(len(c.name) for c in commands)
  lines = [f"usage: {PROG} COMMAND [flags]   (also: python -m recursive_lm COMMAND ...)", "",
           "Adaptive-depth language models: generate, score, convert, train, export, "
           "evaluate, benchmark.", "", "commands:"]
  lines += [f"  {c.name:<{w}}  {c.summary}" for c in commands]
  lines += ["", f"'{PROG} COMMAND --help' lists that command's flags. Every command takes "
            "--debug (tracebacks), --nocompile_cache and --verbose."]
  return "\n".join(lines)


# -- running ------------------------------------------------------------------------
def _owner_hint(name: str, cmd: Command, commands: Sequence[Command]) -> str:
  owners = [c.name for c in commands if c.name != cmd.name and name in flag_values(c)]
  if owners:
    return (f"--{name} is a flag of '{PROG} {' / '.join(owners)}', not of '{cmd.name}'; "
            f"see '{PROG} {cmd.name} --help'")
  return f"'{PROG} {cmd.name}' has no flag --{name}; see '{PROG} {cmd.name} --help'"


def _flag_error(e: flags.Error) -> str:
  """One line for a flag error; a config file's traceback (ml_collections puts
  it in the message) is cut down to its final exception line."""
  text = str(e)
  if "Traceback (most recent call last)" in text:
    head = text.split(":", 1)[0]  # "flag --config=..."
    last = [l for l in text.splitlines() if l.strip()][-1]
    return f"{head}: {last.split(': ', 1)[-1]}"
  return one_line(e)


def _user_error_types() -> tuple:
  from recursive_lm.config import ConfigError  # pylint: disable=g-import-not-at-top
  return (UserError, flags.Error, ConfigError, ValueError, FileNotFoundError,
          IsADirectoryError, NotADirectoryError, PermissionError, UnicodeDecodeError,
          TypeError)


def setup_logging(verbose: bool) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS([PROG], known_only=True)  # absl logging reads its own flags
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)


def run_command(cmd: Command, args: list[str], commands: Sequence[Command]) -> int:
  debug = "--debug" in args
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-help") for a in args):
    print(command_help(cmd, flag_values(cmd)))
    return 0
  try:
    fv = flag_values(cmd)
    argv = [f"{PROG} {cmd.name}"] + (
        cmd.prepare_argv(list(args)) if cmd.prepare_argv else list(args))
    for f in fv._flags().values():  # pylint: disable=protected-access
      if hasattr(f, "_sys_argv"):  # ml_collections config flags read overrides from it
        f._sys_argv = argv  # pylint: disable=protected-access
    try:
      rest = fv(argv)[1:]
    except flags.UnrecognizedFlagError as e:
      raise UserError(_owner_hint(e.flagname, cmd, commands)) from e
    except flags.Error as e:
      raise UserError(f"{_flag_error(e)}; see '{PROG} {cmd.name} --help'") from e
    except (AttributeError, KeyError) as e:  # ml_collections: --config.no_such_field
      overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
      raise UserError(f"{' '.join(overrides) or 'an override'}: the config has no such "
                      f"field ({one_line(e)}); check the field names in the config "
                      "file") from e
    if rest:
      raise UserError(f"unexpected argument(s) {rest}: every input is a --flag (quote "
                      f"multi-word values, e.g. --prompt \"Once upon a time\")")
    setup_logging(fv.verbose)
    if not fv.compile_cache:  # api.load / the trainer read it (compile_cache.enable)
      os.environ["RECURSIVE_LM_COMPILE_CACHE"] = "0"
    rc = cmd.run(fv)
    return 0 if rc is None else int(rc)
  except KeyboardInterrupt:
    log(f"{PROG} {cmd.name}: interrupted")
    return 130
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit):
      raise
    if not isinstance(e, _user_error_types()):
      raise
    if debug:
      traceback.print_exc()
    log(f"{PROG} {cmd.name}: error: {one_line(e)}")
    return USAGE_EXIT


def main(argv: Sequence[str], commands: Sequence[Command]) -> int:
  args = list(argv[1:])
  by_name = {c.name: c for c in commands}
  if not args or args[0] in ("-h", "--help", "help", "--helpshort", "--helpfull"):
    print(main_help(commands))
    return 0 if args else USAGE_EXIT
  if args[0] in ("--version", "version"):
    from recursive_lm import __version__  # pylint: disable=g-import-not-at-top
    print(f"recursive_lm {__version__}")
    return 0
  name = args[0]
  if name not in by_name:
    log(f"{PROG}: error: unknown command {name!r}; choose from "
        f"{', '.join(by_name)} (see '{PROG} --help')")
    return USAGE_EXIT
  return run_command(by_name[name], args[1:], commands)


class Timer:
  def __init__(self):
    self.t = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.t
