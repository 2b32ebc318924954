"""Runs the entry points with tcmalloc on request (JAX-free: call it first).

XLA:CPU allocates and frees the buffers of every op of every step, and with glibc's malloc
some of those are fresh pages from the kernel each time. tcmalloc keeps freed memory in
per-thread caches; it once gave the translation train step 14-36% on a machine of this
project, but on the 2-core AMD EPYC of the README's speed table it gave nothing (1,022 vs 1,134
real tokens/s with malloc, one run each): so it is opt-in, to be measured on your machine
with `experiments/bench_train_step.py`.

`ATTN_JAX_ALLOCATOR=tcmalloc` makes `reexec_with_tcmalloc()` restart the running script with
`LD_PRELOAD` naming the library, once (a library is only preloaded at process start); it logs
and carries on when tcmalloc is not installed (Debian/Ubuntu: `apt-get install
libtcmalloc-minimal4`) and does nothing when `LD_PRELOAD` already names one. The default,
`system`, keeps the C library's malloc.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

ENV_CHOICE = 'ATTN_JAX_ALLOCATOR'  # 'system' (default) or 'tcmalloc'
CHOICES = ('tcmalloc', 'system')
LIBRARIES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
SEARCH_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
               '/usr/lib', '/usr/local/lib')


def find_tcmalloc(search_dirs: Sequence[str] = SEARCH_DIRS) -> str | None:
  """The path of an installed tcmalloc shared library, or None."""
  for directory in search_dirs:
    for name in LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def reexec_with_tcmalloc(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    search_dirs: Sequence[str] = SEARCH_DIRS,
    execve: Callable[..., object] = os.execve,
) -> str | None:
  """Re-executes `python argv...` with tcmalloc preloaded, if `ATTN_JAX_ALLOCATOR=tcmalloc`,
  it is installed and not yet loaded; returns the reason it did not (None only when `execve`
  returned, as in tests).

  Raises:
    ValueError: `ATTN_JAX_ALLOCATOR` is set to something other than CHOICES.
  """
  environ = os.environ if environ is None else environ
  argv = sys.argv if argv is None else argv
  choice = environ.get(ENV_CHOICE, 'system')
  if choice not in CHOICES:
    raise ValueError(f'{ENV_CHOICE}={choice!r} is not one of {CHOICES}')
  if choice == 'system':
    return f'{ENV_CHOICE}=system'
  preloaded = environ.get('LD_PRELOAD', '')
  if 'tcmalloc' in preloaded:
    return 'already preloaded'
  library = find_tcmalloc(search_dirs)
  if library is None:
    logging.warning('%s=tcmalloc but no %s in %s: running with malloc', ENV_CHOICE,
                    ' or '.join(LIBRARIES), ', '.join(search_dirs))
    return 'not installed'
  env = dict(environ, LD_PRELOAD=f'{library} {preloaded}'.strip())
  logging.info('restarting with %s preloaded (%s=tcmalloc)', library, ENV_CHOICE)
  execve(sys.executable, [sys.executable, *argv], env)
  return None
