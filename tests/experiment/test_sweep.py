"""Sweep runner tests: entry validation, names, commands, run/skip/resume/failure, summary.

Runs are launched for real as subprocesses of `fixtures/fake_train.py`, which parses its
flags with ml_collections' config flags like experiments/train.py, "trains" instantly and
writes metrics.jsonl + DONE (see its docstring for the metric values).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from attn_jax.experiment import sweep
from attn_jax.train.metrics import read_metrics

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
CONFIG = str(FIXTURES / 'sweep_config.py')
FAKE_TRAIN = str(FIXTURES / 'fake_train.py')
REPO = pathlib.Path(__file__).parents[2]
RNN = 'model=rnn+learning_rate=0.002'
TF = 'model=transformer+steps=4+tag=it-s-a-b+use_bias=false+dims=4-8'
CRASH = 'crashes_once'


def _get_config():
  return sweep.load_config_module(CONFIG).get_config


def _write_metrics(workdir: pathlib.Path, records: list[dict]) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def _launches(workdir: pathlib.Path) -> int:
  path = workdir / 'launches.txt'
  return len(path.read_text().splitlines()) if path.exists() else 0


# --- Entries and names -----------------------------------------------------------------------


def test_load_sweep_names_and_values():
  runs = sweep.load_sweep(CONFIG)
  assert [r.name for r in runs] == [RNN, TF, CRASH]
  assert runs[1] == sweep.Run(TF, 'model=transformer,steps=4', {
      'fake.tag': "it's a b", 'fake.use_bias': False, 'fake.dims': (4, 8)})


@pytest.mark.parametrize('arg, overrides, name', [
    ('', {}, 'default'),
    ('task=reverse,model=rnn', {'optim.learning_rate': 1e-3},
     'task=reverse+model=rnn+learning_rate=0.001'),
    (' a=1 , b=2 ', {'x.y.z': 1e-5, 'flag': True}, 'a=1+b=2+z=1e-05+flag=true'),
    ('variant=B/32', {'tag': 'two words', 'dims': [4, 8]}, 'variant=B-32+tag=two-words+dims=4-8'),
    ('-x=..', {}, 'x=..'),
])
def test_derive_name(arg, overrides, name):
  assert sweep.derive_name(arg, overrides) == name


def test_long_names_are_cut_with_a_hash_of_the_full_text():
  a = sweep.derive_name('x=' + 'a' * 300, {})
  b = sweep.derive_name('x=' + 'a' * 299 + 'b', {})
  assert len(a) == len(b) == sweep.MAX_NAME_LEN
  assert a[:100] == b[:100] and a != b


def test_names_unique_when_sanitizing_collapses_entries():
  runs = sweep.parse_sweep([{'arg': 'v=a/b'}, {'arg': 'v=a b'}, {'arg': 'v=a?b'},
                            {'arg': 'x', 'name': 'v=a-b-2'}])
  assert [r.name for r in runs] == ['v=a-b', 'v=a-b-3', 'v=a-b-4', 'v=a-b-2']


@pytest.mark.parametrize('entries, message', [
    ([], 'non-empty list'),
    ({'arg': 'x'}, 'non-empty list'),
    ([{'arg': 'model=rnn'}, 'model=rnn'], 'sweep entry 1: expected a dict'),
    ([{'arg': 'model=rnn', 'override': {}}], r"sweep entry 0: unknown keys \['override'\]"),
    ([{'arg': 'model=rnn'}, {'arg': ['model=rnn']}], 'sweep entry 1: arg must be a string'),
    ([{'arg': 3}], 'sweep entry 0: arg must be a string'),
    ([{'overrides': [('optim.learning_rate', 1.0)]}], 'sweep entry 0: overrides must be a dict'),
    ([{'overrides': {'optim learning_rate': 1.0}}], 'sweep entry 0: override field'),
    ([{'overrides': {'fake.tag': None}}], "sweep entry 0: override 'fake.tag'.*NoneType"),
    ([{'overrides': {'fake.tag': {'a': 1}}}], "sweep entry 0: override 'fake.tag'.*dict"),
    ([{'name': 'a/b'}], 'sweep entry 0: name'),
    ([{'name': ''}], 'sweep entry 0: name'),
    ([{'name': 'a,b'}], 'sweep entry 0: name'),
    ([{'arg': 'model=rnn', 'name': 'a'}, {'name': 'a'}], 'entries 0 and 1 have the same name'),
    ([{'arg': 'model=rnn'}, {}, {'arg': 'model=rnn', 'overrides': {}}],
     'entries 0 and 2 are the same run'),
    ([{}, {'arg': 'modle=rnn'}], r"sweep entry 1: get_config\('modle=rnn'\) failed: unknown"),
    ([{}, {'overrides': {'optim.lr': 0.1}}], "sweep entry 1: .*no field 'optim.lr'"),
    ([{'overrides': {'fake.nope.deeper': 1}}], "sweep entry 0: .*no field 'fake.nope'"),
    ([{'overrides': {'fake.num_steps': 0.5}}], 'sweep entry 0: override fake.num_steps=0.5'),
    ([{'overrides': {'optim.learning_rate': 'fast'}}], 'sweep entry 0: override optim.learn'),
])
def test_bad_entries_raise_naming_the_entry(entries, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_sweep(entries, get_config=_get_config())


def test_common_overrides():
  assert sweep.parse_common_overrides(['a.b=1', 'config.c= x=y ']) == {'a.b': '1', 'c': ' x=y '}
  for items, message in [(['a.b'], 'must look like field.name=value'),
                         (['a b=1'], 'must look like'), (['a=1', 'a=2'], "'a' given twice")]:
    with pytest.raises(ValueError, match=message):
      sweep.parse_common_overrides(items)
  get_config = _get_config()
  runs = sweep.parse_sweep([{}], get_config=get_config, common_overrides={'fake.tag': 'x'})
  assert runs[0].overrides == {}
  with pytest.raises(ValueError, match=r"sweep entry 0 \(common override\): .*no field 'fake.tg'"):
    sweep.parse_sweep([{}], get_config=get_config, common_overrides={'fake.tg': 'x'})
  with pytest.raises(ValueError, match="sweep entry 1: override 'fake.tag' is also set for every"):
    sweep.parse_sweep([{}, {'overrides': {'fake.tag': 'y'}}], common_overrides={'fake.tag': 'x'})


def test_int_override_of_float_field_is_accepted():
  runs = sweep.parse_sweep([{'overrides': {'optim.learning_rate': 1}}], get_config=_get_config())
  assert runs[0].overrides == {'optim.learning_rate': 1}


def test_config_without_sweep_is_an_error(tmp_path):
  path = tmp_path / 'nosweep.py'
  path.write_text('def get_config(arg=None):\n  return None\n')
  with pytest.raises(ValueError, match='defines no sweep'):
    sweep.load_sweep(path)
  with pytest.raises(ValueError, match='does not exist'):
    sweep.load_sweep(tmp_path / 'missing.py')


def test_select_runs():
  runs = sweep.load_sweep(CONFIG)
  assert sweep.select_runs(runs, None) == runs
  assert sweep.select_runs(runs, [CRASH, RNN]) == [runs[0], runs[2]]  # Sweep order.
  with pytest.raises(ValueError, match=r"--only names \['nope'\] are not in the sweep"):
    sweep.select_runs(runs, [RNN, 'nope'])


@pytest.mark.parametrize('name, mode', [
    ('valid/loss', 'min'), ('valid/perplexity', 'min'), ('test/token_error_rate', 'min'),
    ('valid/accuracy', 'max'), ('valid/seq_acc', 'max'), ('bleu', 'max'), ('test/chrf', 'max'),
    ('valid/num_tokens', None), ('valid/lossless_count', None),
])
def test_metric_mode(name, mode):
  assert sweep.metric_mode(name) == mode


# --- Commands and dry runs --------------------------------------------------------------------


def test_dry_run_prints_shell_quoted_commands_of_unfinished_runs(tmp_path):
  runs = sweep.load_sweep(CONFIG)
  (tmp_path / RNN).mkdir()
  (tmp_path / RNN / 'DONE').write_text('')
  printed = []
  statuses = sweep.run_sweep(runs, config_path=CONFIG, base_workdir=tmp_path,
                             train_script=FAKE_TRAIN, python='python3', dry_run=True,
                             common_overrides={'model.name': 'a "b"'}, print_fn=printed.append)
  assert statuses == {RNN: 'done', TF: 'missing', CRASH: 'missing'}
  assert [shlex.split(line) for line in printed] == [
      ['python3', FAKE_TRAIN, f'--config={CONFIG}:model=transformer,steps=4',
       f'--workdir={tmp_path / TF}', '--config.model.name=a "b"',
       "--config.fake.tag=it's a b", '--config.fake.use_bias=false', '--config.fake.dims=(4, 8)'],
      ['python3', FAKE_TRAIN, f'--config={CONFIG}:model=rnn', f'--workdir={tmp_path / CRASH}',
       '--config.model.name=a "b"', '--config.fake.fail_at_step=3',
       '--config.fake.fail_launches=1'],
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == [RNN]  # Nothing ran.


def test_command_without_arg_passes_the_bare_config_path(tmp_path):
  cmd = sweep.train_command(sweep.Run('r', '', {}), config_path='c.py', base_workdir=tmp_path,
                            python='py')
  assert cmd == ['py', sweep.DEFAULT_TRAIN_SCRIPT, '--config=c.py', f'--workdir={tmp_path / "r"}']


def test_missing_train_script_fails_before_running(tmp_path):
  with pytest.raises(ValueError, match='train script .*nope.py'):
    sweep.run_sweep(sweep.load_sweep(CONFIG), config_path=CONFIG, base_workdir=tmp_path,
                    train_script=str(tmp_path / 'nope.py'))
  assert list(tmp_path.iterdir()) == []


# --- Running ----------------------------------------------------------------------------------


def test_run_skip_resume_and_failure(tmp_path, caplog):
  runs = sweep.load_sweep(CONFIG)
  kwargs = dict(config_path=CONFIG, base_workdir=tmp_path, train_script=FAKE_TRAIN)
  # An unfinished TF run from an earlier launch (e.g. killed at step 2): it must resume.
  _write_metrics(tmp_path / TF, [{'step': 1, 'time': 1.0, 'train/loss': 1.0},
                                 {'step': 2, 'time': 2.0, 'train/loss': 0.5}])
  assert sweep.run_status(tmp_path / TF) == 'running'

  statuses = sweep.run_sweep(runs, **kwargs)
  assert statuses == {RNN: 'done', TF: 'done', CRASH: 'failed'}
  # Overrides reach the train script with their types (parsed by ml_collections flags).
  config = json.loads((tmp_path / TF / 'config.json').read_text())
  assert config['fake'] == {'num_steps': 4, 'fail_at_step': 0, 'fail_launches': 0,
                            'tag': "it's a b", 'use_bias': False, 'dims': [4, 8],
                            'wait_for_sigterm': False, 'preempt_launches': 0}
  assert config['model'] == {'name': 'transformer'}
  assert json.loads((tmp_path / RNN / 'config.json').read_text())['optim'] == {
      'learning_rate': 0.002}
  assert [r['step'] for r in read_metrics(tmp_path / TF)] == [1, 2, 3, 4, 4]
  # The crash is reported (exit code, log tail) and recorded; the other runs went on.
  assert (tmp_path / CRASH / 'FAILED').read_text().startswith('exit code 3\n')
  assert 'fake training crashed at step 3' in (tmp_path / CRASH / 'sweep.log').read_text()
  assert any('crashes_once FAILED (exit code 3' in r.message
             and 'fake training crashed at step 3' in r.message for r in caplog.records)

  # Second launch: finished runs are skipped, the failed one is relaunched and resumes.
  statuses = sweep.run_sweep(runs, **kwargs)
  assert statuses == {RNN: 'done', TF: 'done', CRASH: 'done'}
  assert [_launches(tmp_path / n) for n in (RNN, TF, CRASH)] == [1, 1, 2]
  assert not (tmp_path / CRASH / 'FAILED').exists()
  assert [r['step'] for r in read_metrics(tmp_path / CRASH)] == [1, 2, 2, 3, 4, 4, 5, 6, 6]

  # --only restricts which runs are touched.
  (tmp_path / RNN / 'DONE').unlink()
  (tmp_path / CRASH / 'DONE').unlink()
  assert sweep.run_sweep(runs, only=[CRASH], **kwargs) == {CRASH: 'done'}
  assert [_launches(tmp_path / n) for n in (RNN, TF, CRASH)] == [1, 1, 3]


def test_exit_zero_without_done_stays_running(tmp_path):
  script = tmp_path / 'preempted.py'
  script.write_text('import sys\nprint("stopping early")\n')
  runs = sweep.parse_sweep([{'arg': 'a=1'}])
  statuses = sweep.run_sweep(runs, config_path=CONFIG, base_workdir=tmp_path / 'sweep',
                             train_script=str(script))
  assert statuses == {'a=1': 'running'}
  assert 'stopping early' in (tmp_path / 'sweep' / 'a=1' / 'sweep.log').read_text()


# --- Summary ----------------------------------------------------------------------------------


def test_summary_table_contents(tmp_path):
  runs = sweep.parse_sweep([
      {'arg': 'm=a', 'overrides': {'optim.lr': 0.5, 'tag': 'x|y'}, 'name': 'done_run'},
      {'arg': 'm=b', 'name': 'running_run'},
      {'arg': 'm=c', 'name': 'failed_run'},
      {'arg': 'm=d', 'name': 'missing_run'},
  ])
  _write_metrics(tmp_path / 'done_run', [
      {'step': 10, 'time': 1.0, 'train/loss': 9.0, 'train/accuracy': 0.99},
      {'step': 10, 'time': 1.0, 'valid/loss': 2.0, 'valid/accuracy': 0.25, 'bleu': 10.0},
      {'step': 20, 'time': 2.0, 'valid/loss': 1.5, 'valid/accuracy': 0.625, 'bleu': 30.0},
      {'step': 30, 'time': 3.0, 'valid/loss': 1.75, 'valid/accuracy': 0.5, 'bleu': 20.0},
  ])
  (tmp_path / 'done_run' / 'DONE').write_text('')
  _write_metrics(tmp_path / 'running_run', [
      {'step': 5, 'time': 1.0, 'valid/loss': 3.0, 'valid/num_tokens': 7.0},
      {'step': 6, 'time': 1.0, 'train/loss': 1.0},
      {'step': 7, 'time': 1.0, 'valid/loss': None, 'valid/num_tokens': 8.0},
  ])
  _write_metrics(tmp_path / 'failed_run', [{'step': 1, 'time': 1.0, 'train/loss': 1.0}])
  (tmp_path / 'failed_run' / 'FAILED').write_text('exit code 1\n')

  columns, rows = sweep.summarize(runs, tmp_path)
  assert columns == ['name', 'arg', 'overrides', 'status', 'steps', 'bleu:final', 'bleu:best',
                     'valid/accuracy:final', 'valid/accuracy:best', 'valid/loss:final',
                     'valid/loss:best', 'valid/num_tokens:final', 'valid/num_tokens:best']
  assert math.isnan(rows[1]['valid/loss:final'])  # Last value was null (non-finite).

  csv_path, md_path = sweep.write_summary(runs, tmp_path)
  assert list(csv.reader(io.StringIO(csv_path.read_text()))) == [
      columns,
      ['done_run', 'm=a', 'optim.lr=0.5 tag=x|y', 'done', '30', '20.0', '30.0', '0.5', '0.625',
       '1.75', '1.5', '', ''],
      ['running_run', 'm=b', '', 'running', '7', '', '', '', '', 'nan', '3.0', '8.0', ''],
      ['failed_run', 'm=c', '', 'failed', '1', '', '', '', '', '', '', '', ''],
      ['missing_run', 'm=d', '', 'missing', '', '', '', '', '', '', '', '', ''],
  ]
  picked, rows = sweep.summarize(runs, tmp_path, ['valid/loss', 'test/bleu'])
  assert picked[5:] == ['valid/loss:final', 'valid/loss:best', 'test/bleu:final',
                         'test/bleu:best']
  assert [(r['valid/loss:final'], r['test/bleu:best']) for r in rows[::2]] == [
      (1.75, None), (None, None)]

  md = md_path.read_text().splitlines()
  assert md[0] == '| ' + ' | '.join(columns) + ' |'
  assert md[1] == '|' + '|'.join(['---'] * len(columns)) + '|'
  assert md[2] == (r'| done_run | m=a | optim.lr=0.5 tag=x\|y | done | 30 | 20 | 30 | 0.5 | '
                   '0.625 | 1.75 | 1.5 |  |  |')
  assert md[3] == '| running_run | m=b |  | running | 7 |  |  |  |  | nan | 3 | 8 |  |'
  assert len(md) == 6


def test_cli_runs_sweep_reports_failure_and_prints_dry_run(tmp_path):
  base = tmp_path / 'sweep'
  cmd = [sys.executable, str(REPO / 'experiments' / 'sweep.py'), f'--config={CONFIG}',
         f'--base_workdir={base}', f'--train_script={FAKE_TRAIN}', '--override=model.name=common']
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  assert proc.returncode == 1, proc.stderr  # One run crashed; the others finished.
  assert 'crashes_once FAILED (exit code 3' in proc.stderr
  summary = list(csv.DictReader(io.StringIO((base / 'summary.csv').read_text())))
  assert [(r['name'], r['status'], r['steps']) for r in summary] == [
      (RNN, 'done', '6'), (TF, 'done', '4'), (CRASH, 'failed', '2')]
  assert summary[0]['valid/loss:final'] == repr(2 * 0.002 / 3)
  assert summary[0]['valid/accuracy:best'] == '0.875'
  assert proc.stdout == (base / 'summary.md').read_text()  # The table is printed too.
  for name in (RNN, TF):  # The common override reached every run.
    assert json.loads((base / name / 'config.json').read_text())['model']['name'] == 'common'

  proc = subprocess.run(cmd + ['--dry_run', f'--only={CRASH},{RNN}'], capture_output=True,
                        text=True, env=env, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [shlex.join(sweep.train_command(
      sweep.load_sweep(CONFIG)[2], config_path=CONFIG, base_workdir=base,
      train_script=FAKE_TRAIN, common_overrides={'model.name': 'common'}))]


def test_sigterm_is_passed_to_the_run_and_stops_the_sweep(tmp_path):
  base = tmp_path / 'sweep'
  cmd = [sys.executable, str(REPO / 'experiments' / 'sweep.py'), f'--config={CONFIG}',
         f'--base_workdir={base}', f'--train_script={FAKE_TRAIN}', f'--only={RNN},{TF}',
         '--override=fake.wait_for_sigterm=true']
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
  try:
    deadline = time.monotonic() + 120
    while not (base / RNN / 'started').exists():  # The first run is up and waiting.
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # To the sweep only, as a cluster preemption might.
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 128 + signal.SIGTERM, stderr
  assert (base / RNN / 'got_sigterm').read_text() == 'True'  # Forwarded: it could checkpoint.
  assert not (base / TF).exists()  # No further run started.
  assert sweep.run_status(base / RNN) == 'running'  # Resumes next time; not marked failed.
  assert 'sweep stopped by signal 15' in stderr
  assert f'| {RNN} | model=rnn | optim.learning_rate=0.002 | running |' in stdout
