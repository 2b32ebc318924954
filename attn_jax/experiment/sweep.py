r"""Sweeps: run the entries of a config's `sweep()` one after another, then summarize them.

A config file (`configs/x.py`) may define, next to `get_config(arg)`,

    def sweep():
      return [{'arg': 'task=reverse,model=rnn', 'overrides': {'optim.learning_rate': 1e-3}},
              {'arg': 'task=reverse,model=transformer', 'name': 'reverse_tf'}]

Each entry is one training run, launched as its own process

    python experiments/train.py --config configs/x.py:ARG --workdir BASE/NAME --config.K=V ...

so a crash of one run is reported, not fatal. The runner is resumable: a run whose workdir
holds a `DONE` file (written by the train script when it finishes) is skipped; an unfinished
one is launched again and resumes from its own checkpoint. A run that exits non-zero gets a
`FAILED` file (exit code and command) and its output stays in `BASE/NAME/sweep.log`. A
SIGTERM to the sweep (a preempted job) is passed on to the running training, which saves a
checkpoint; the sweep then stops (`SweepInterrupted`) and resumes when launched again.

Entry keys: 'arg' (str, the part after `:`; default ''), 'overrides' (dict of dotted config
field -> bool/int/float/str/tuple value; default {}), 'name' (optional workdir name; derived
from arg + overrides when absent, see `derive_name`). Entries are checked against
`get_config(arg)` before anything runs, so a typo in a field name fails at once. Overrides
shared by every run (data paths, say) are given to the runner, not written into `sweep()`:
`experiments/sweep.py --override data.local.train=/data/train`.

Summary (`BASE/summary.csv`, `BASE/summary.md`): one row per run with name, arg, overrides,
status (done/failed/running/missing), steps (last step in metrics.jsonl) and, for every eval
metric (every key of metrics.jsonl except step, time and `train/*`), its final value (the last
one written; 'nan' where training wrote null for a non-finite value) and its best value, in the
direction the run's task and evaluators declare (its `metric_directions.json`; a run written
before directions were declared falls back on `metric_mode`, the rule of those days).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import logging
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections

from attn_jax.experiment.workdir import (
    DONE_FILE,
    FAILED_FILE,
    SWEEP_LOG,
    is_finished,
    read_metric_directions,
)
from attn_jax.train.metrics import best_values, metric_direction, metric_mode, read_metrics

SUMMARY_CSV = 'summary.csv'
SUMMARY_MD = 'summary.md'
STATUSES = ('done', 'failed', 'running', 'missing')
ENTRY_KEYS = ('arg', 'overrides', 'name')
DEFAULT_TRAIN_SCRIPT = 'experiments/train.py'
MAX_NAME_LEN = 120
LOG_TAIL_LINES = 20

# No ',' in names: `--only` takes a comma-separated list of them.
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._=+-]*$')
_UNSAFE_RE = re.compile(r'[^A-Za-z0-9._=+-]+')
_FIELD_RE = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

class SweepInterrupted(Exception):
  """The sweep got SIGTERM: the current run was passed the signal (to checkpoint) and has
  exited; no further run was started. `statuses` as `run_sweep` would have returned them."""

  def __init__(self, signum: int, statuses: dict[str, str]):
    super().__init__(f'sweep stopped by signal {signum}; launch it again to resume')
    self.signum = signum
    self.statuses = statuses


@dataclasses.dataclass(frozen=True)
class Run:
  """One sweep entry, validated: `name` is its workdir under the sweep's base workdir."""

  name: str
  arg: str
  overrides: Mapping[str, Any]


def format_value(value: Any) -> str:
  """The text of `--config.K=<text>` that ml_collections' config flags parse back to `value`.

  Raises:
    ValueError: for types a config flag cannot carry (None, dicts, objects).
  """
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, int | float):
    return repr(value)
  if isinstance(value, str):
    return value
  if isinstance(value, tuple | list):
    for item in value:
      format_value(item)  # Validates the items.
    return repr(tuple(value))
  raise ValueError(f'override value {value!r} of type {type(value).__name__} cannot be passed '
                   'as --config.K=V (use bool, int, float, str or a tuple of those)')


def overrides_text(overrides: Mapping[str, Any]) -> str:
  """`{'optim.lr': 0.1, 'x': 'a'}` -> `'optim.lr=0.1 x=a'` (for tables and logs)."""
  return ' '.join(f'{k}={format_value(v)}' for k, v in overrides.items())


def derive_name(arg: str, overrides: Mapping[str, Any]) -> str:
  """A readable, filesystem-safe workdir name from an entry's arg and overrides.

  `('task=reverse,model=rnn', {'optim.learning_rate': 1e-3})` ->
  `'task=reverse+model=rnn+learning_rate=0.001'`: the arg items, then one `field=value` per
  override with the field's last dotted component (tuples as `4-8`), joined by '+'. Runs of
  characters outside `[A-Za-z0-9._=+-]` become '-'; a name longer than MAX_NAME_LEN is cut
  and ends in a hash of the full text, so it stays distinct. `parse_sweep` makes names unique
  within a sweep ('-2', '-3', ... for names that collide).
  """
  parts = [item.strip() for item in arg.split(',') if item.strip()]
  for key, value in overrides.items():
    format_value(value)  # Validates the type.
    text = '-'.join(map(format_value, value)) if isinstance(value, tuple | list) else (
        format_value(value))
    parts.append(f'{key.rsplit(".", 1)[-1]}={text}')
  name = '+'.join(_UNSAFE_RE.sub('-', p).strip('-') for p in parts).lstrip('-.=+') or 'default'
  if len(name) > MAX_NAME_LEN:
    digest = hashlib.sha1(','.join(parts).encode()).hexdigest()[:8]
    name = f'{name[:MAX_NAME_LEN - 9]}-{digest}'
  return name


def load_config_module(config_path: str | os.PathLike) -> ModuleType:
  """Imports a config file by path (like ml_collections' `--config path.py`)."""
  path = pathlib.Path(config_path)
  if not path.is_file():
    raise ValueError(f'config file {str(path)!r} does not exist')
  module_name = 'sweep_config_' + re.sub(r'\W', '_', path.stem)
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_override(config: Any, field: str, value: Any, where: str, *, assign: bool = True
                    ) -> None:
  """Checks `config.<field>` exists and, with `assign`, that `value` fits it (by assigning to a
  scratch copy of the config, as the train script's flag will)."""
  parts = field.split('.')
  node = config
  for i, part in enumerate(parts):
    try:
      child = node[part]
    except (KeyError, TypeError, AttributeError):
      raise ValueError(f'{where}: override {field!r}: the config has no field '
                       f'{".".join(parts[:i + 1])!r}') from None
    if i == len(parts) - 1 and assign:
      try:
        node[part] = tuple(value) if isinstance(value, list) else value
      except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: override {field}={value!r} does not fit the field '
                         f'(currently {child!r}): {e}') from None
    node = child


def parse_sweep(entries: Any, *, get_config: Callable[..., Any] | None = None,
                common_overrides: Mapping[str, str] | None = None) -> list[Run]:
  """Validates `sweep()` output and names every run.

  Args:
    entries: the list returned by a config's `sweep()`.
    get_config: the config's `get_config`; if given, every entry's arg must be accepted by it
      and every override must name an existing field and fit its type.
    common_overrides: `{field: text}` added to every run's command (see
      `parse_common_overrides`); with `get_config`, each field must exist in every run's
      config. An entry may not override the same field.

  Returns:
    One Run per entry, in order, with unique names.

  Raises:
    ValueError: naming the entry index, for a non-dict entry, an unknown key, a non-string arg,
      bad overrides, a bad or repeated name, or two identical entries.
  """
  if not isinstance(entries, list | tuple) or not entries:
    raise ValueError(f'sweep() must return a non-empty list of dicts, got {entries!r}')
  parsed = []
  for i, entry in enumerate(entries):
    where = f'sweep entry {i}'
    if not isinstance(entry, Mapping):
      raise ValueError(f'{where}: expected a dict with keys {ENTRY_KEYS}, got {entry!r}')
    unknown = sorted(set(entry) - set(ENTRY_KEYS), key=str)
    if unknown:
      raise ValueError(f'{where}: unknown keys {unknown}; known keys: {list(ENTRY_KEYS)}')
    arg = entry.get('arg', '')
    if not isinstance(arg, str):
      raise ValueError(f'{where}: arg must be a string like "task=reverse,model=rnn", '
                       f'got {arg!r} ({type(arg).__name__})')
    overrides = entry.get('overrides', {})
    if not isinstance(overrides, Mapping):
      raise ValueError(f'{where}: overrides must be a dict of field -> value, got {overrides!r}')
    for field, value in overrides.items():
      if not isinstance(field, str) or not _FIELD_RE.match(field):
        raise ValueError(f'{where}: override field {field!r} is not a dotted config field name')
      try:
        format_value(value)
      except ValueError as e:
        raise ValueError(f'{where}: override {field!r}: {e}') from None
      if field in (common_overrides or {}):
        raise ValueError(f'{where}: override {field!r} is also set for every run '
                         f'(common override {field}={common_overrides[field]})')
    name = entry.get('name')
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)
                             or len(name) > 200):
      raise ValueError(f'{where}: name {name!r} must be a string of at most 200 characters '
                       'from [A-Za-z0-9._=+-], not starting with punctuation')
    if get_config is not None:
      try:
        config = get_config(arg) if arg else get_config()
      except Exception as e:  # Whatever get_config raises, it is this entry's arg at fault.
        raise ValueError(f'{where}: get_config({arg!r}) failed: {e}') from e
      if isinstance(config, ml_collections.ConfigDict):
        config = config.copy_and_resolve_references()  # A scratch copy to assign into.
        for field, value in overrides.items():
          _check_override(config, field, value, where)
        for field in common_overrides or {}:
          _check_override(config, field, None, where + ' (common override)', assign=False)
      else:
        logging.warning('%s: get_config returned a %s, not a ConfigDict; overrides unchecked',
                        where, type(config).__name__)
    parsed.append((i, arg, dict(overrides), name))
  return _assign_names(parsed)


def _assign_names(parsed: list[tuple[int, str, dict[str, Any], str | None]]) -> list[Run]:
  seen_entries: dict[tuple[str, str], int] = {}
  for i, arg, overrides, _ in parsed:
    key = (arg, repr(sorted(overrides.items())))
    if key in seen_entries:
      raise ValueError(f'sweep entries {seen_entries[key]} and {i} are the same run '
                       f'(arg {arg!r}, overrides {overrides!r})')
    seen_entries[key] = i
  taken: dict[str, int] = {}
  for i, _, _, name in parsed:
    if name is not None:
      if name in taken:
        raise ValueError(f'sweep entries {taken[name]} and {i} have the same name {name!r}')
      taken[name] = i
  runs = []
  for i, arg, overrides, name in parsed:
    if name is None:
      base = derive_name(arg, overrides)
      name, k = base, 1
      while name in taken:  # Two entries that differ only in characters the name drops.
        k += 1
        name = f'{base}-{k}'
      taken[name] = i
    runs.append(Run(name=name, arg=arg, overrides=overrides))
  return runs


def parse_common_overrides(items: Iterable[str]) -> dict[str, str]:
  """`['data.local.train=/x.tsv', ...]` -> `{'data.local.train': '/x.tsv'}`: overrides for every
  run (e.g. data paths), passed verbatim as `--config.K=V` and typed by the train script.

  Raises:
    ValueError: for an item without '=', a bad field name or a field given twice.
  """
  out: dict[str, str] = {}
  for item in items:
    field, sep, value = item.partition('=')
    field = field.strip().removeprefix('config.')
    if not sep or not _FIELD_RE.match(field):
      raise ValueError(f'common override {item!r} must look like field.name=value')
    if field in out:
      raise ValueError(f'common override {field!r} given twice')
    out[field] = value
  return out


def load_sweep(config_path: str | os.PathLike, *, check: bool = True,
               common_overrides: Mapping[str, str] | None = None) -> list[Run]:
  """The validated runs of `config_path`'s `sweep()` (checked against its `get_config`)."""
  module = load_config_module(config_path)
  if not callable(getattr(module, 'sweep', None)):
    raise ValueError(f'config file {str(config_path)!r} defines no sweep() function')
  get_config = getattr(module, 'get_config', None)
  if check and not callable(get_config):
    raise ValueError(f'config file {str(config_path)!r} defines no get_config() function')
  return parse_sweep(module.sweep(), get_config=get_config if check else None,
                     common_overrides=common_overrides)


def select_runs(runs: Sequence[Run], only: Iterable[str] | None) -> list[Run]:
  """The runs named in `only` (all runs if None/empty), in sweep order."""
  only = [n.strip() for n in (only or ()) if n.strip()]
  if not only:
    return list(runs)
  names = [r.name for r in runs]
  unknown = [n for n in only if n not in names]
  if unknown:
    raise ValueError(f'--only names {unknown} are not in the sweep; its runs are {names}')
  return [r for r in runs if r.name in only]


def train_command(run: Run, *, config_path: str, base_workdir: str | os.PathLike,
                  train_script: str = DEFAULT_TRAIN_SCRIPT, python: str = sys.executable,
                  common_overrides: Mapping[str, str] | None = None) -> list[str]:
  """The argv that trains `run` in `base_workdir/run.name` (common overrides first)."""
  config = f'{config_path}:{run.arg}' if run.arg else str(config_path)
  cmd = [python, str(train_script), f'--config={config}',
         f'--workdir={pathlib.Path(base_workdir) / run.name}']
  cmd += [f'--config.{k}={v}' for k, v in (common_overrides or {}).items()]
  cmd += [f'--config.{k}={format_value(v)}' for k, v in run.overrides.items()]
  return cmd


def run_status(workdir: str | os.PathLike) -> str:
  """'done' (DONE file), 'failed' (FAILED file), 'running' (started, unfinished) or 'missing'.

  'running' also covers a run that was stopped (killed, preempted) and will resume when the
  sweep is launched again.
  """
  workdir = pathlib.Path(workdir)
  if is_finished(workdir):
    return 'done'
  if (workdir / FAILED_FILE).exists():
    return 'failed'
  if workdir.is_dir() and any(workdir.iterdir()):
    return 'running'
  return 'missing'


def _tail(path: pathlib.Path, n: int) -> str:
  lines = path.read_text(errors='replace').splitlines() if path.exists() else []
  return '\n'.join(lines[-n:])


def _wait_forwarding_sigterm(cmd: list[str], **popen_kwargs: Any) -> tuple[int, int | None]:
  """Runs `cmd` to completion; a SIGTERM to this process (a preempted sweep job) is passed on
  to it, so that training checkpoints and exits. Returns (exit code, signal received or None).

  SIGINT is not forwarded: Ctrl-C already reaches the whole foreground process group.
  """
  received, procs = [], []

  def forward(signum, frame):
    del frame
    received.append(signum)
    for proc in procs:
      proc.send_signal(signum)

  main = threading.current_thread() is threading.main_thread()  # Handlers need the main thread.
  # Installed before the child exists, so no signal falls between its start and the handler.
  previous = signal.signal(signal.SIGTERM, forward) if main else None
  try:
    procs.append(subprocess.Popen(cmd, **popen_kwargs))
    if received:  # Arrived while the child was being started.
      procs[0].send_signal(received[0])
    rc = procs[0].wait()
  finally:
    if main:
      signal.signal(signal.SIGTERM, previous)
    if procs and procs[0].poll() is None:  # Interrupted by an exception: no orphan training.
      procs[0].kill()
      procs[0].wait()
  return rc, (received[0] if received else None)


def launch(run: Run, cmd: list[str], workdir: pathlib.Path) -> tuple[str, int | None]:
  """Runs one training process, output appended to workdir/sweep.log.

  Returns:
    The run's status afterwards and the signal that stopped the sweep meanwhile (or None).
  """
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / FAILED_FILE).unlink(missing_ok=True)
  log_path = workdir / SWEEP_LOG
  env = dict(os.environ)
  # attn_jax is used from a checkout (not installed): the train script must import this copy.
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (str(_REPO_ROOT), env.get('PYTHONPATH', '')) if p)
  with log_path.open('a') as log:
    log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")} sweep launch: {shlex.join(cmd)}\n')
    log.flush()
    start = time.time()
    rc, signum = _wait_forwarding_sigterm(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  elapsed = time.time() - start
  if rc != 0 and signum is None:
    (workdir / FAILED_FILE).write_text(f'exit code {rc}\n{shlex.join(cmd)}\n')
    logging.error('run %s FAILED (exit code %d after %.1f s); last lines of %s:\n%s',
                  run.name, rc, elapsed, log_path, _tail(log_path, LOG_TAIL_LINES))
    return 'failed', None
  status = run_status(workdir)
  if signum is not None:
    logging.warning('run %s stopped by forwarded signal %d after %.1f s (exit code %d), status '
                    '%s', run.name, signum, elapsed, rc, status)
  elif status != 'done':
    logging.warning('run %s exited 0 after %.1f s without writing %s (preempted?); launch the '
                    'sweep again to resume it', run.name, elapsed, DONE_FILE)
  else:
    logging.info('run %s done in %.1f s', run.name, elapsed)
  return status, signum


def run_sweep(runs: Sequence[Run], *, config_path: str, base_workdir: str | os.PathLike,
              train_script: str = DEFAULT_TRAIN_SCRIPT, python: str = sys.executable,
              only: Iterable[str] | None = None, dry_run: bool = False,
              common_overrides: Mapping[str, str] | None = None,
              print_fn: Callable[[str], None] = print) -> dict[str, str]:
  """Trains the selected runs one after another, skipping finished ones.

  Args:
    runs: from `load_sweep`.
    config_path: the config file, as the train script should receive it.
    base_workdir: each run trains in `base_workdir/<name>`.
    train_script: the script launched per run (tests inject a fake one).
    python: interpreter for the train script.
    only: run names to restrict to (others are left alone).
    dry_run: print one shell-quoted command per unfinished run (for a cluster scheduler)
      through `print_fn` instead of running anything.
    common_overrides: `--config.K=V` text added to every run (`parse_common_overrides`).

  Returns:
    `{name: status}` for the selected runs after this call (see `run_status`); in a dry run,
    the status they had.

  Raises:
    SweepInterrupted: on SIGTERM, after the current run has exited (it gets the signal too).
  """
  selected = select_runs(runs, only)
  if not pathlib.Path(train_script).is_file():
    raise ValueError(f'train script {train_script!r} does not exist (run from the repository '
                     'root or pass --train_script)')
  base = pathlib.Path(base_workdir)
  statuses = {}
  for i, run in enumerate(selected, 1):
    workdir = base / run.name
    status = run_status(workdir)
    if status == 'done':
      logging.info('[%d/%d] %s: already done, skipped', i, len(selected), run.name)
      statuses[run.name] = status
      continue
    cmd = train_command(run, config_path=config_path, base_workdir=base,
                        train_script=train_script, python=python,
                        common_overrides=common_overrides)
    if dry_run:
      print_fn(shlex.join(cmd))
      statuses[run.name] = status
      continue
    logging.info('[%d/%d] %s: %s (output in %s)', i, len(selected), run.name,
                 'resuming' if status in ('running', 'failed') else 'starting',
                 workdir / SWEEP_LOG)
    statuses[run.name], signum = launch(run, cmd, workdir)
    if signum is not None:
      raise SweepInterrupted(signum, statuses)
  return statuses


# ---------------------------------------------------------------------------------------------
# Summary table.


def _is_eval_metric(key: str) -> bool:
  return key not in ('step', 'time') and not key.startswith('train/')


def summarize(runs: Sequence[Run], base_workdir: str | os.PathLike,
              metrics: Sequence[str] | None = None) -> tuple[list[str], list[dict[str, Any]]]:
  """Columns and one row per run: name, arg, overrides, status, steps, `<metric>:final`,
  `<metric>:best` for each of `metrics` (default: every eval metric any run wrote, sorted).

  Cells are str/int/float, None where the run has no such value, or float('nan') where the
  last value written was null (non-finite). Best ignores nulls, and follows each run's declared
  metric directions (`metric_mode` for a run saved before them); it is None for metrics with
  no direction (a length, a count).
  """
  base = pathlib.Path(base_workdir)
  records = {r.name: read_metrics(base / r.name) for r in runs}
  directions = {r.name: read_metric_directions(base / r.name) for r in runs}
  written = {k for recs in records.values() for rec in recs for k in rec if _is_eval_metric(k)}
  if metrics is None:
    metrics = sorted(written)
  elif set(metrics) - written:
    logging.warning('summary metrics %s are in no run (yet); their columns stay empty; the '
                    'runs have %s', sorted(set(metrics) - written), sorted(written))
  unknown = [m for m in metrics if all(
      (metric_mode(m) if d is None else metric_direction(m, d)) is None
      for d in directions.values())]
  if unknown:
    logging.info('no best value for metrics without a direction: %s', unknown)
  columns = ['name', 'arg', 'overrides', 'status', 'steps']
  columns += [f'{m}:{kind}' for m in metrics for kind in ('final', 'best')]
  rows = []
  for run in runs:
    recs = records[run.name]
    row = {'name': run.name, 'arg': run.arg, 'overrides': overrides_text(run.overrides),
           'status': run_status(base / run.name),
           'steps': max((int(r['step']) for r in recs if 'step' in r), default=None)}
    best = best_values(recs, metrics, directions[run.name])
    for m in metrics:
      values = [r[m] for r in recs if m in r]
      row[f'{m}:final'] = (float('nan') if values[-1] is None else values[-1]) if values else None
      row[f'{m}:best'] = best[m]['value'] if m in best else None
    rows.append(row)
  return columns, rows


def _cell(value: Any, float_format: str | None) -> str:
  if value is None:
    return ''
  if isinstance(value, float) and float_format is not None:
    return format(value, float_format)
  return str(value)


def summary_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
  """CSV text; floats at full precision (repr), missing values empty."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(columns)
  for row in rows:
    writer.writerow([_cell(row[c], None) for c in columns])
  return out.getvalue()


def summary_markdown(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
  """A GitHub markdown table; floats with 6 significant digits, missing values empty."""
  def esc(text: str) -> str:
    return text.replace('|', r'\|')
  lines = ['| ' + ' | '.join(esc(c) for c in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(esc(_cell(row[c], '.6g')) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def write_summary(runs: Sequence[Run], base_workdir: str | os.PathLike,
                  metrics: Sequence[str] | None = None) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `base_workdir/summary.csv` and `summary.md` (see `summarize`); returns their paths."""
  base = pathlib.Path(base_workdir)
  base.mkdir(parents=True, exist_ok=True)
  columns, rows = summarize(runs, base, metrics)
  csv_path, md_path = base / SUMMARY_CSV, base / SUMMARY_MD
  csv_path.write_text(summary_csv(columns, rows))
  md_path.write_text(summary_markdown(columns, rows))
  return csv_path, md_path
