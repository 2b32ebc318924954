"""The entry points' allocator switch: with ATTN_JAX_ALLOCATOR=tcmalloc, re-executes once with
tcmalloc preloaded when installed; by default keeps malloc."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from attn_jax.experiment import allocator

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _fake_library(directory: pathlib.Path) -> str:
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / allocator.LIBRARIES[0]
  path.write_bytes(b'')
  return str(path)


def test_reexec_preloads_the_found_library_and_keeps_argv_and_environment(tmp_path):
  library = _fake_library(tmp_path / 'lib')
  calls = []
  reason = allocator.reexec_with_tcmalloc(
      ['train.py', '--workdir=w'],
      {'LD_PRELOAD': 'libother.so', 'HOME': '/h', allocator.ENV_CHOICE: 'tcmalloc'},
      search_dirs=[str(tmp_path / 'missing'), str(tmp_path / 'lib')],
      execve=lambda *args: calls.append(args))
  assert reason is None
  [(executable, argv, env)] = calls
  assert executable == sys.executable and argv == [sys.executable, 'train.py', '--workdir=w']
  assert env == {'LD_PRELOAD': f'{library} libother.so', 'HOME': '/h',
                 allocator.ENV_CHOICE: 'tcmalloc'}


@pytest.mark.parametrize('environ, reason', [
    ({'LD_PRELOAD': '/x/libtcmalloc.so.4', allocator.ENV_CHOICE: 'tcmalloc'},
     'already preloaded'),
    ({allocator.ENV_CHOICE: 'system'}, f'{allocator.ENV_CHOICE}=system'),
    ({}, f'{allocator.ENV_CHOICE}=system'),  # the default
])
def test_no_reexec_when_preloaded_or_opted_out(tmp_path, environ, reason):
  _fake_library(tmp_path)
  calls = []
  assert allocator.reexec_with_tcmalloc([], environ, search_dirs=[str(tmp_path)],
                                        execve=lambda *a: calls.append(a)) == reason
  assert not calls


def test_not_installed_and_bad_choice(tmp_path):
  assert allocator.find_tcmalloc([str(tmp_path)]) is None
  assert allocator.reexec_with_tcmalloc([], {allocator.ENV_CHOICE: 'tcmalloc'},
                                        search_dirs=[str(tmp_path)],
                                        execve=pytest.fail) == 'not installed'
  with pytest.raises(ValueError, match="ATTN_JAX_ALLOCATOR='jemalloc' is not one of"):
    allocator.reexec_with_tcmalloc([], {allocator.ENV_CHOICE: 'jemalloc'})


def test_a_real_process_restarts_exactly_once(tmp_path):
  # An empty file stands in for the library: the loader warns and ignores it, which is
  # enough to see the restart happen once and the script run to its end with its arguments.
  library = _fake_library(tmp_path / 'lib')
  script = tmp_path / 'entry.py'
  script.write_text(textwrap.dedent(f'''
      import os, sys
      from attn_jax.experiment import allocator
      print('start', flush=True)
      allocator.reexec_with_tcmalloc(search_dirs=[{str(tmp_path / 'lib')!r}])
      print('main', sys.argv[1:], os.environ['LD_PRELOAD'])
  '''))
  env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  env.update(PYTHONPATH=str(ROOT), **{allocator.ENV_CHOICE: 'tcmalloc'})
  proc = subprocess.run([sys.executable, str(script), 'a', '--b'], env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ['start', 'start', f"main ['a', '--b'] {library}"]
