"""The package's layering, read from the source: which layer may import which, and no import
cycles (a module-level import graph, function-level imports included).

    ops <- models <- experiment -> data, train      (tokens: a leaf every layer may read)
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'attn_jax'
# Layer -> the layers it may import. `tokens` (special ids) and `_lazy` (lazy exports) are
# leaves that import nothing from attn_jax.
ALLOWED = {
    'ops': {'ops'},
    'models': {'models', 'ops', 'tokens', '_lazy'},
    'data': {'data', 'tokens', '_lazy'},
    'train': {'train', 'tokens', '_lazy'},
    'experiment': {'experiment', 'models', 'ops', 'data', 'train', 'tokens', '_lazy'},
    'tokens': set(),
    '_lazy': set(),
    '__init__': set(),
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _layer(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else '__init__'


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
      isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _imports(path: pathlib.Path, *, runtime_only: bool) -> set[str]:
  """attn_jax modules `path` imports (a name imported from a package resolves to its
  submodule when there is one); `runtime_only` skips `if TYPE_CHECKING:` blocks."""
  tree = ast.parse(path.read_text(encoding='utf-8'))
  skipped: set[int] = set()
  if runtime_only:
    for node in ast.walk(tree):
      if isinstance(node, ast.If) and _is_type_checking(node):
        skipped |= {id(n) for child in node.body for n in ast.walk(child)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.split('.')[0] == 'attn_jax'}
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.split('.')[0] == 'attn_jax'):
      for alias in node.names:
        sub = f'{node.module}.{alias.name}'
        found.add(sub if sub in MODULES else node.module)
  return found


@pytest.mark.parametrize('module', sorted(MODULES))
def test_each_layer_imports_only_the_layers_below_it(module):
  layer = _layer(module)
  bad = sorted(m for m in _imports(MODULES[module], runtime_only=False)
               if _layer(m) != layer and _layer(m) not in ALLOWED[layer])
  assert not bad, f'{module} ({layer}) imports {bad}; {layer} may import {sorted(ALLOWED[layer])}'


def test_no_import_cycles():
  graph = {m: _imports(p, runtime_only=True) & set(MODULES) - {m} for m, p in MODULES.items()}
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def visit(module, path):
    state[module] = 1
    for dep in sorted(graph[module]):
      if state.get(dep) == 1:
        cycle = path[path.index(dep):] + [dep]
        pytest.fail('import cycle: ' + ' -> '.join(cycle))
      if dep not in state:
        visit(dep, path + [dep])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
