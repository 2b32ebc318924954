"""Runs the entry points with tcmalloc when the machine has it (JAX-free: call it first).

On a CPU, XLA allocates and frees the buffers of every op of every step; with glibc's malloc
many of those allocations are fresh pages from the kernel (page faults, `madvise`), a fifth of
the CPU time of a small model's train step in a profile. tcmalloc keeps freed memory in
per-thread caches. The gain on the translation train step is in the README's speed table
(`experiments/bench_train_step.py`, run with and without it).

`reexec_with_tcmalloc()` restarts the running script with `LD_PRELOAD` naming the library,
once: a library is only preloaded at process start. It does nothing when tcmalloc is not
installed (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`), when `LD_PRELOAD`
already names one, or when `ATTN_JAX_ALLOCATOR=system` (keep the C library's malloc).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

ENV_CHOICE = 'ATTN_JAX_ALLOCATOR'  # 'tcmalloc' (default: when installed) or 'system'
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
  """Re-executes `python argv...` with tcmalloc preloaded, if it is installed and not yet
  loaded; returns the reason it did not (None only when `execve` returned, as in tests).

  Raises:
    ValueError: `ATTN_JAX_ALLOCATOR` is set to something other than CHOICES.
  """
  environ = os.environ if environ is None else environ
  argv = sys.argv if argv is None else argv
  choice = environ.get(ENV_CHOICE, 'tcmalloc')
  if choice not in CHOICES:
    raise ValueError(f'{ENV_CHOICE}={choice!r} is not one of {CHOICES}')
  if choice == 'system':
    return f'{ENV_CHOICE}=system'
  preloaded = environ.get('LD_PRELOAD', '')
  if 'tcmalloc' in preloaded:
    return 'already preloaded'
  library = find_tcmalloc(search_dirs)
  if library is None:
    return 'not installed'
  env = dict(environ, LD_PRELOAD=f'{library} {preloaded}'.strip())
  logging.info('restarting with %s preloaded (%s=system keeps malloc)', library, ENV_CHOICE)
  execve(sys.executable, [sys.executable, *argv], env)
  return None
