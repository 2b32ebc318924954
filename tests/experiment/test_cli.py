"""How the entry points end: a user error is one line and status 2 (the traceback only at
--verbosity=1 or higher); anything else keeps its traceback."""

from __future__ import annotations

import pytest
from absl import logging as absl_logging

from attn_jax.experiment import cli
from attn_jax.train.checkpoint import StateMismatchError


def _raising(error):
  def main(argv):
    raise error
  return main


@pytest.mark.parametrize('error', [
    ValueError("config.train.num_steps=0 must be an int >= 1"),
    FileNotFoundError(2, 'No such file or directory', 'in.txt'),
    StateMismatchError('checkpoint step 2 holds\nanother state', step=2, differences=[]),
])
def test_user_error_is_one_line_and_status_2(error, capsys):
  with pytest.raises(SystemExit) as e:
    cli.guarded(_raising(error))(['prog'])
  assert e.value.code == cli.EXIT_USER_ERROR == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ') and 'Traceback' not in err
  assert ' '.join(str(error).split()) in err


def test_verbosity_1_adds_the_traceback(capsys):
  previous = absl_logging.get_verbosity()
  absl_logging.set_verbosity(1)
  try:
    with pytest.raises(SystemExit):
      cli.guarded(_raising(ValueError('bad value')))(['prog'])
  finally:
    absl_logging.set_verbosity(previous)
  err = capsys.readouterr().err
  assert 'Traceback' in err and err.strip().splitlines()[-1] == 'error: bad value'


def test_other_errors_keep_their_traceback():
  with pytest.raises(FloatingPointError):
    cli.guarded(_raising(FloatingPointError('non-finite loss at step 3')))(['prog'])
  assert cli.guarded(lambda argv: 0)(['prog']) == 0
