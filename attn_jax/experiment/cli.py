"""How the entry points in experiments/ end: a user error is one line on stderr and status 2.

    if __name__ == '__main__':
      cli.run(main)  # instead of absl.app.run(main)

A user error is a mistake in what was asked for, not in the code:
  - a bad flag: an unknown or mistyped `--config.<field>=`, an unknown `:key=value` of a
    config file, a missing required flag (absl's `flags.Error`, and the AttributeError with
    which ml_collections refuses an unknown field, raised while the flags are parsed);
  - a bad config value, a bad or missing data or run file, a refused re-run: the layers raise
    ValueError naming the field or the file (`validate_config` of each section,
    `attn_jax.data.local`, `workdir.read_json`) and `checkpoint.StateMismatchError` is one;
  - an input file that does not exist (FileNotFoundError).
It prints `error: <message>` as one line and exits with status 2 (absl and argparse use 2 for
usage errors); with `--verbosity=1` or higher the traceback comes first. Anything else (a bug,
a diverged run's FloatingPointError) keeps Python's traceback and status 1. A ValueError raised
by a bug deeper down reads as a user error too: `--verbosity=1` shows where it came from.

A quiet console: the INFO (and DEBUG) records of libraries (orbax, absl, jax, grain, TFDS...)
are dropped unless `--verbosity=1` or higher asks for them; attn_jax's own INFO lines and every
library's warnings stay. `config_summary` says which config a run uses in one line: the file,
its argument and the fields the command line changed (the full config is in the workdir).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging

USER_ERRORS = (ValueError, FileNotFoundError)
EXIT_USER_ERROR = 2


def fail(error: BaseException | str) -> NoReturn:
  """Prints `error: <message>` on one line and exits with EXIT_USER_ERROR."""
  message = ' '.join(str(error).split()) or type(error).__name__
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _flag_error_message(error: Exception) -> str:
  if isinstance(error, AttributeError | KeyError):
    # ml_collections' way of saying that a `--config.<field>=` override names no field.
    field = str(error).strip('"\'')
    return f'unknown config field {field!r} in a --config.<field>=value override'
  message = str(error)
  if 'Traceback (most recent call last)' in message:
    # config_flags quotes the config file's whole traceback: its last line says what is wrong.
    head = message.split('Traceback (most recent call last)')[0]
    message = head + message.strip().splitlines()[-1].strip()
  return message


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad flag being a user error (absl itself exits with 1)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    fail(f'{_flag_error_message(e)} (--helpshort lists the flags)')


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with its user errors turned into `fail` (the traceback first at verbosity >= 1)."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except USER_ERRORS as e:
      if absl_logging.get_verbosity() >= 1:
        traceback.print_exc()
      fail(e)

  return wrapped


# The project's own code: its INFO records reach the console at the default verbosity.
_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), d) + os.sep for d in ('attn_jax', 'experiments'))


class LibraryInfoFilter(logging.Filter):
  """Passes warnings and errors, and INFO/DEBUG records only from files of this project."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(
        _PROJECT_DIRS)


def quiet_libraries(verbosity: int | None = None) -> logging.Filter | None:
  """Below `--verbosity=1`, adds a `LibraryInfoFilter` to the root logger's handlers (where
  absl's and every library's records end); returns it (None when nothing was filtered)."""
  if (absl_logging.get_verbosity() if verbosity is None else verbosity) >= 1:
    return None
  quiet = LibraryInfoFilter()
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)
  return quiet


def config_summary(path: str, overrides: Mapping[str, Any], workdir: str) -> str:
  """One line: the config file (`path`, with its `:arg` as given), the fields set on the
  command line, and where the full config is written."""
  changed = ', '.join(f'{k}={v!r}' for k, v in sorted(overrides.items())) or 'none'
  return (f'config {path}; command-line overrides: {changed}; full config: '
          f'{os.path.join(workdir, "config.json")}')


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with user errors as one line and status 2, and library INFO logs
  hidden below `--verbosity=1`."""
  guarded_main = guarded(main)

  def quiet_main(argv: list[str]) -> Any:
    quiet_libraries()
    return guarded_main(argv)

  app.run(quiet_main, flags_parser=parse_flags)
