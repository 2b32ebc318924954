"""Lazy package exports (PEP 562), so that importing one light module of a package (say
`attn_jax.models.configs`, which config files need) does not import JAX through the package's
`__init__`.

    __getattr__, __dir__ = _lazy.exports(__name__, {'EncoderDecoder': 'transformer', ...})

A public name is imported from its submodule on first use and then cached in the package;
submodules are reachable as attributes too (`models.decoding`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def exports(package: str, names: Mapping[str, str]
            ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
  """`__getattr__` and `__dir__` for `package`, exporting `names`: public name -> submodule."""

  def __getattr__(name: str) -> object:
    if name in names:
      value = getattr(importlib.import_module(f'{package}.{names[name]}'), name)
    else:
      try:
        value = importlib.import_module(f'{package}.{name}')
      except ModuleNotFoundError as e:
        if e.name != f'{package}.{name}':
          raise  # The submodule exists but one of its own imports is missing.
        raise AttributeError(f'module {package!r} has no attribute {name!r}') from None
    setattr(sys.modules[package], name, value)
    return value

  def __dir__() -> list[str]:
    return sorted(set(names) | set(vars(sys.modules[package])))

  return __getattr__, __dir__
