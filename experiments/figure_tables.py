r"""Writes the results tables of README.md and docs/ from the figure files they come from.

  python experiments/figure_tables.py           # rewrite every table in place
  python experiments/figure_tables.py --check   # exit 1 naming each table that differs

A table lives in any markdown file of the repository between two markers,

  <!-- table:NAME -->
  ...generated...
  <!-- /table:NAME -->

and NAME is a renderer below, each reading one JSON file under `experiments/figures/` (which
must carry its provenance record, `attn_jax.experiment.provenance`) and writing a line that
says where the numbers came from (revision, date, machine, versions) and the table. Prose
never restates a number the script does not write. `tests/test_figure_tables.py` runs
`--check`, so a committed table cannot drift from its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import sys
from collections.abc import Callable
from typing import Any

from attn_jax.experiment import ablation_report, stats

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIGURES = ROOT / 'experiments' / 'figures'
MARKER = re.compile(r'(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table:\2 -->)', re.S)
PAGES = ('README.md', 'docs/**/*.md')


def _source(name: str, record: dict[str, Any]) -> str:
  p = record['provenance']
  machine = p['machine']
  where = machine.get('device') or machine.get('cpu', '?')
  versions = ', '.join(f'{k} {v}' for k, v in p['versions'].items() if v and k != 'python')
  dirty = ' (uncommitted changes)' if p.get('git_dirty') else ''
  note = ' Provenance recorded after the fact from git history.' if p.get('note', '').startswith(
      'recorded after') else ''
  return (f"*From `experiments/figures/{name}`: revision `{str(p['git_revision'])[:9]}`{dirty}, "
          f"{str(p['date'])[:10]}, {where}, {machine.get('cores', '?')} cores"
          f"{', ' + versions if versions else ''}.{note}*")


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _x(value: float, digits: int = 2) -> str:
  return f'{value:.{digits}f}x'


# --- Renderers: record -> markdown table ------------------------------------------------------


def train_step(r: dict) -> str:
  names = {'attn_jax': 'attn_jax', 'attn_jax_no_pad_skip': 'attn_jax, padding computed',
           'flax_linen': 'flax.linen modules'}
  rows = [[names.get(k, k), f"{v['params']:,}", f"{v['median_step_s']:.2f} s",
           f"{v['tokens_per_s']:,.0f}", f"{v['model_gflops']:.1f}", f"{v['utilisation']:.0%}"]
          for k, v in r['results'].items()]
  return (_table(['model', 'parameters', 'step', 'real tokens/s', 'model GFLOP/s',
                  'of the matmul rate'], rows)
          + f"\n\nattn_jax / flax.linen: **{_x(r['ratio'])}**; matmul rate "
            f"{r['matmul_gflops']:.0f} GFLOP/s; {r['real_tokens_per_step']:,} real tokens of "
            f"{r['batch']} x {r['length']} per step.")


def decode_speed(r: dict) -> str:
  lm = _table(['generated tokens', 'KV cache tok/s', 'recompute tok/s', 'speed-up', 'same tokens'],
              [[d['tokens'], f"{d['cache_tok_s']:,.0f}", f"{d['recompute_tok_s']:,.0f}",
                _x(d['speedup'], 1), d['same_tokens']] for d in r['decoder_lm']])
  cross = _table(['search', 'cross K/V cached tok/s', 'projected every step', 'speed-up'],
                 [[c['method'], f"{c['cached_cross_tok_s']:,.0f}",
                   f"{c['recomputed_cross_tok_s']:,.0f}", _x(c['speedup'])]
                  for c in r['encoder_decoder_cross']])
  return lm + '\n\n' + cross


def beam_speed(r: dict) -> str:
  rows = [[b['path'], f"{b['steady_sent_s']:.2f}", _x(b['speedup_steady']),
           f"{b['first_pass_sent_s']:.2f}", _x(b['speedup_first_pass']), b['outputs_differing']]
          for b in r['rows']]
  return _table(['path', 'steady sent/s', 'vs baseline', 'first pass sent/s', 'vs baseline',
                 'outputs differing'], rows)


def budget_translation(r: dict) -> str:
  rows = [[b['name'], b['steps'], f"{b['test']['bleu']:.2f}", f"{b['test']['chrf']:.1f}"]
          for b in r['rows'] if b.get('test')]
  return _table(['run', 'steps', 'test BLEU', 'test chrF'], rows) + f"\n\n{r['corpus']}."


def context_parallel_memory(r: dict) -> str:
  devices = sorted({x['devices'] for x in r['results']})
  cells = {(x['strategy'], x['kv_heads'], x['devices']): x['temp_bytes'] / 2**20
           for x in r['results']}
  rows = []
  for strategy, kv in dict.fromkeys((x['strategy'], x['kv_heads']) for x in r['results']):
    rows.append([strategy, kv] + [f'{cells[(strategy, kv, d)]:.1f}' if (strategy, kv, d) in cells
                                  else '-' for d in devices])
  c = r['config']
  return (_table(['strategy', 'K/V heads'] + [f'{d} device{"s" * (d > 1)}' for d in devices],
                 rows)
          + f"\n\nCompiled temporaries per device, MiB: {c['length']:,} tokens, {c['heads']} "
            f"heads x {c['head_dim']}, {c['dtype']}, {c['mask']}, {c['layout']} layout, "
            f"{c['program']} (compiled, not run).")


def decode_window(r: dict) -> str:
  s = r['settings']
  rows = [[x['pattern'], f"{x['ms_per_step']:.2f}", f"{x['tokens_per_second']:,.0f}",
           f"{x['cache_bytes'] / 2**20:.1f}", f"{x['step_ratio']:.3f}", f"{x['cache_ratio']:.3f}"]
          for x in r['rows']]
  return (_table(['layers', 'ms / step', 'tokens/s', 'cache MiB', 'step vs all-global',
                  'cache vs all-global'], rows)
          + f"\n\nDecoderLM of {s['layers']} layers, d_model {s['d_model']}, {s['heads']} heads, "
            f"after a {s['context']:,}-token prompt, window {s['window']}.")


def context_extension(r: dict) -> str:
  lengths = r['lengths']
  by = {(s['method'], s['length']): s for s in r['summary']}
  methods = list(dict.fromkeys(s['method'] for s in r['summary']))
  rows = []
  for method in methods:
    positional = next(s['positional'] for s in r['summary'] if s['method'] == method)
    plain = {'rope': 'RoPE', 'alibi': 'ALiBi', 'nope': 'NoPE'}[positional]
    cells = []
    for n in lengths:
      s = by.get((method, n)) or by.get((plain, n))
      cells.append('-' if s is None else f"{s['bits_per_char']:.3f} ± {s['ci95']:.3f}")
    rows.append([method] + cells)
  seeds = max(s['seeds'] for s in r['summary'])
  return (_table(['bits per character'] + [f'{n} chars' for n in lengths], rows)
          + f"\n\nMean ± 95% t-interval over {seeds} seeds; trained on {r['train_length']}-"
            'character rows; scalings applied at evaluation only.')


def scan_compile(r: dict) -> str:
  rows = [[x['num_layers'], x['remat'], f"{x['scan']['total_s']:.1f}",
           f"{x['unrolled']['total_s']:.1f}", _x(x['unrolled_over_scan'], 1)]
          for x in r['results']]
  c = r['config']
  return (_table(['layers', 'remat', 'scan s', 'unrolled s', 'unrolled / scan'], rows)
          + f"\n\nTrace + lower + compile of a `{c['variant']}` DecoderLM's "
            f"{'AdamW train step' if c.get('train_step') else 'forward+backward'}, batch "
            f"{c['batch']} x {c['seq_len']}.")


def image_classification(r: dict) -> str:
  """One row per configuration: test accuracy as the mean over its seeds ± the half-width of
  the 95% t-interval (a single seed has none), each seed's test accuracy, and the minutes a
  run took."""
  groups: dict[tuple, list[dict]] = {}
  for x in r['runs']:
    m = x['model']
    groups.setdefault((m['positional'], m['pooling'], x['steps']), []).append(x)
  rows = []
  for (positional, pooling, steps), runs in groups.items():
    test = [x['final']['test/accuracy'] for x in runs]
    mean, half = stats.t_interval(test)
    rows.append([positional, pooling, steps, len(runs),
                 f'{mean:.1%}' + ('' if math.isnan(half) else f' ± {half:.1%}'),
                 ', '.join(f'{t:.1%}' for t in test),
                 ', '.join(f"{x['minutes']:.1f}" for x in runs)])
  return _table(['positions', 'pooling', 'steps', 'seeds', 'test accuracy (95% CI)',
                 'per seed', 'minutes per run'], rows)


def _cell(row: dict | None) -> str:
  if row is None:
    return '-'
  if row['status'] != 'ok':
    return row['status']
  peak = f" ({row['peak_rss_gib']:.2f} GiB)" if row.get('peak_rss_gib') else ''
  return f"{row['median_s']:.3g} s{peak}"


def attention_kernels(r: dict) -> str:
  """Forward+backward seconds (peak memory) per implementation and length, causal and not."""
  impls = list(dict.fromkeys(x['impl'] for x in r['rows']))
  rows_by = {(x['impl'], x['length'], x['causal']): x for x in r['rows'] if x['backward']}
  keys = sorted({(x['length'], x['causal']) for x in r['rows'] if x['backward']})
  rows = [[f'{n:,}', 'yes' if causal else 'no'] + [_cell(rows_by.get((i, n, causal)))
                                                    for i in impls] for n, causal in keys]
  return (_table(['tokens', 'causal'] + impls, rows)
          + f"\n\nForward+backward, batch {r['batch']}, {r['heads']} heads x {r['head_dim']}, "
            f"float32; median seconds (peak RSS of the case's process); matmul ceiling "
            f"{r['matmul_gflops']:.0f} GFLOP/s.")


def attention_patterns(r: dict) -> str:
  """attn_jax's forward+backward time per pattern and length, and its ratio to the pattern
  without the feature (causal; full for documents)."""
  reference = {'causal_mod': 'causal', 'window': 'causal', 'softcap': 'causal',
               'documents': 'full'}
  ours = {(x['pattern'], x['length']): x for x in r['rows']
          if x['impl'] == 'attn_blockwise' and x['backward'] and x['status'] == 'ok'}
  lengths = sorted({n for _, n in ours})
  rows = []
  for pattern in dict.fromkeys(p for p, _ in ours):
    cells = []
    for n in lengths:
      x, ref = ours.get((pattern, n)), ours.get((reference.get(pattern, ''), n))
      ratio = f" ({x['median_s'] / ref['median_s']:.3f} of {reference[pattern]})" if (
          x and ref) else ''
      cells.append('-' if x is None else f"{x['median_s']:.3g} s{ratio}")
    rows.append([pattern] + cells)
  return (_table(['pattern'] + [f'{n:,} tokens' for n in lengths], rows)
          + f"\n\nattn_jax blockwise, forward+backward, batch {r['batch']}, {r['heads']} heads x "
            f"{r['head_dim']}, float32; window {r['window']}, soft-cap {r['soft_cap']}, "
            f"{r['documents']} documents.")


def length_study(r: dict) -> str:
  rows = [[r['labels'].get(name, name)]
          + [f"{m[part][key]:.3f}" for part in ('in_range', 'out_of_range')
             for key in ('sequence_accuracy', 'token_accuracy')] + [m['step']]
          for name, m in r['models'].items()]
  lo, hi = r['train_length']
  return _table(['model', f'exact match, {lo}-{hi}', f'token accuracy, {lo}-{hi}',
                 f'exact match, > {hi}', f'token accuracy, > {hi}', 'steps'], rows)


def ablation(r: dict) -> str:
  """Mean over seeds per variant and task metric: with its 95% t-interval and the tests
  against the baseline (`ablation_report`'s own table), or, in records of the 2-seed pilot,
  with half the seeds' range."""
  if 'rank_stability' in r:  # the study's own format (issue #26 onwards)
    return ablation_report.markdown_table(r['aggregate'], r['labels'], r['metrics']).rstrip()
  columns = [(task, name) for task, metrics in r['metrics'].items() for name in metrics]
  rows = []
  for variant, tasks in r['aggregate'].items():
    cells = []
    for task, name in columns:
      m = tasks.get(task, {}).get('metrics', {}).get(name)
      cells.append('-' if m is None else f"{m['mean']:.3f} ± {m['spread']:.3f}")
    rows.append([r['labels'].get(variant, variant)] + cells)
  return (_table(['variant'] + [f'{t}: {n}' for t, n in columns], rows)
          + '\n\nMean over seeds ± half their range.')


RENDERERS: dict[str, tuple[str, Callable[[dict], str]]] = {
    'attention_kernels': ('attention_bench.json', attention_kernels),
    'attention_patterns': ('patterns.json', attention_patterns),
    'length_study': ('length_study.json', length_study),
    'ablation': ('ablation.json', ablation),
    'ablation_pilot': ('ablation_pilot.json', ablation),
    'train_step': ('train_step_malloc.json', train_step),
    'decode_speed': ('decode_speed.json', decode_speed),
    'beam_speed': ('beam_speed.json', beam_speed),
    'budget_translation': ('budget_translation.json', budget_translation),
    'context_parallel_memory': ('context_parallel_memory.json', context_parallel_memory),
    'decode_window': ('decode_window.json', decode_window),
    'context_extension': ('context_extension.json', context_extension),
    'scan_compile': ('scan_compile_train_step.json', scan_compile),
    'image_classification': ('image_classification.json', image_classification),
}


def render(name: str) -> str:
  """The generated block of table `name` (source line + table), from its figure file."""
  from attn_jax.experiment import provenance

  if name not in RENDERERS:
    raise ValueError(f'no renderer for table {name!r}; known: {sorted(RENDERERS)}')
  filename, fn = RENDERERS[name]
  path = FIGURES / filename
  if not path.exists():
    return f'*Not yet measured: `experiments/figures/{filename}` does not exist.*\n'
  record = json.loads(path.read_text())
  provenance.check(record.get('provenance'), str(path))
  return f'{_source(filename, record)}\n\n{fn(record)}\n'


def pages() -> list[pathlib.Path]:
  return sorted({p for pattern in PAGES for p in ROOT.glob(pattern)})


def update(text: str) -> str:
  return MARKER.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true', help='report tables that differ; write '
                      'nothing')
  args = parser.parse_args(argv)
  stale = []
  for page in pages():
    text = page.read_text(encoding='utf-8')
    new = update(text)
    if new != text:
      stale.append(str(page.relative_to(ROOT)))
      if not args.check:
        page.write_text(new, encoding='utf-8')
  if args.check and stale:
    print('tables differ from their figure files in: ' + ', '.join(stale) +
          ' (run python experiments/figure_tables.py)', file=sys.stderr)
    return 1
  print(('checked' if args.check else 'wrote') + f' the tables of {len(pages())} pages')
  return 0


if __name__ == '__main__':
  sys.exit(main())
