"""Smoke runs of every config through `train_and_evaluate` (2 steps, tiny sizes), so no config
rots; pmap and sharded on the 8 fake CPU devices; the quickstart's smoke run trained long enough
to learn; re-runs on its workdir (refused, allowed); decode.py on a finished workdir, also with
checkpoint averaging."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from attn_jax.experiment import inference, plots, run
from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import loop, optim
from attn_jax.train import state as state_lib
from attn_jax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN_FILES = ('config.json', 'data_meta.json', 'tokenizers.json', 'metrics.jsonl', 'DONE')
# The quickstart's smoke run trains this long (~4 s on 2 cores once compiled): enough for its
# loss to fall by the factor test_algorithmic_transformer_smoke_learns states.
LEARN_STEPS = 300


def _config(name: str, arg: str, data_dir, **overrides):
  spec = importlib.util.spec_from_file_location(f'configs_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.data_dir = str(data_dir)
  config.train.tensorboard = False
  for field, value in overrides.items():
    section, leaf = field.split('.')
    config[section][leaf] = value
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture
def fake_plots(monkeypatch):
  """Records every `attn_jax.experiment.plots.plot_attention` call (then draws the real PNG) and
  checks the contract `weights [heads, q, kv]` against the token lists."""
  calls = []
  real = plots.plot_attention

  def plot_attention(weights, *, query_tokens, key_tokens, title, path):
    weights = np.asarray(weights)
    assert weights.ndim == 3 and weights.shape[1:] == (len(query_tokens), len(key_tokens)), (
        weights.shape, len(query_tokens), len(key_tokens))
    # Rows of real queries over real keys are (sub-)distributions.
    assert np.all(weights >= 0) and np.all(weights.sum(-1) <= 1 + 1e-4)
    real(weights, query_tokens=query_tokens, key_tokens=key_tokens, title=title, path=path)
    assert pathlib.Path(path).stat().st_size > 1000
    calls.append(title)

  monkeypatch.setattr(plots, 'plot_attention', plot_attention)
  return calls


def _check_run(workdir: pathlib.Path, steps: int = 2) -> dict:
  for name in RUN_FILES:
    assert (workdir / name).exists(), name
  done = json.loads((workdir / 'DONE').read_text())
  assert done['step'] == steps
  assert np.isfinite(done['final'][next(k for k in done['final'] if k.endswith('/loss'))])
  train = [r for r in read_metrics(workdir) if 'train/loss' in r]
  assert [r['step'] for r in train] == list(range(1, steps + 1))
  return done


@pytest.fixture(scope='module')
def reverse_run(tmp_path_factory, data_dir):
  """The quickstart config's smoke run for LEARN_STEPS steps (shared by the re-run and decode
  tests)."""
  workdir = tmp_path_factory.mktemp('reverse')
  mp = pytest.MonkeyPatch()
  calls = []
  real = plots.plot_attention

  def recording_plot(weights, **kwargs):
    calls.append(kwargs['title'])
    real(weights, **kwargs)

  mp.setattr(plots, 'plot_attention', recording_plot)
  try:
    run.train_and_evaluate(_config('algorithmic', 'smoke', data_dir,
                                   **{'train.num_steps': LEARN_STEPS}), workdir)
  finally:
    mp.undo()
  return workdir, calls


def test_algorithmic_transformer_smoke_learns(reverse_run):
  workdir, calls = reverse_run
  done = _check_run(workdir, LEARN_STEPS)
  # A 1+1-layer Transformer (d_model 32) on reverse over 64 generated sequences of 1-6 symbols:
  # the train loss falls ~17x in LEARN_STEPS steps (2.8 -> 0.16, measured), and the held-out
  # loss to less than half the first one. Not learning (a broken loss, mask or optimizer)
  # would not fall 5x.
  loss = [r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r]
  first, last = np.mean(loss[:10]), np.mean(loss[-10:])
  assert last < first / 5, (first, last)
  assert done['final']['validation/loss'] < first / 1.5, (first, done['final'])
  assert 0.0 <= done['final']['validation/sequence_accuracy'] <= 1.0
  assert any(k.startswith('validation/sequence_accuracy_len_') for k in done['final'])
  kinds = {t.split(' layer')[0] for t in calls}
  assert kinds == {'encoder_self', 'decoder_self', 'cross'}
  assert len(list((workdir / 'attention').rglob('*.png'))) == len(calls)


def _checksums(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob('*')) if p.is_file()}


def test_rerun_that_changes_the_state_is_refused_and_changes_nothing(reverse_run, data_dir,
                                                                     tmp_path):
  """The issue's new user: the same command with one model field changed. Refused with one
  line naming the field and the ways forward, status 2, no teardown noise, workdir intact."""
  workdir = tmp_path / 'run'
  shutil.copytree(reverse_run[0], workdir)
  before = _checksums(workdir)
  out = _script('train.py', f'--config={ROOT / "configs" / "algorithmic.py"}:smoke',
                f'--workdir={workdir}', f'--config.data_dir={data_dir}',
                f'--config.train.num_steps={LEARN_STEPS}', '--config.model.d_model=64')
  assert out.returncode == 2, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: this config differs from'), last
  assert 'model.d_model 32 -> 64' in last and '(32,) float32 -> (64,) float32' in last
  assert '--workdir' in last and '--config.train.on_mismatch=restart' in last
  for noise in ('Traceback', 'Event loop is closed', 'never retrieved'):
    assert noise not in out.stderr, out.stderr[-3000:]
  assert _checksums(workdir) == before


def test_rerun_that_keeps_the_state_resumes_and_records_the_changes(reverse_run, data_dir,
                                                                    tmp_path, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(reverse_run[0], workdir)
  metrics = (workdir / 'metrics.jsonl').read_text()
  config = _config('algorithmic', 'smoke', data_dir, **{
      'train.num_steps': LEARN_STEPS, 'optim.learning_rate': 0.01, 'eval.beam_size': 3})
  result = run.train_and_evaluate(config, workdir)  # Restores the last step: nothing to train.
  assert result.start_step == result.step == LEARN_STEPS
  changes = {'eval.beam_size': [2, 3], 'optim.learning_rate': [0.002, 0.01]}
  record = json.loads((workdir / 'config_changes.jsonl').read_text())
  assert record['step'] == LEARN_STEPS and record['changes'] == changes
  assert 'eval.beam_size 2 -> 3, optim.learning_rate 0.002 -> 0.01' in caplog.text
  assert json.loads((workdir / 'config.json').read_text())['optim']['learning_rate'] == 0.01
  assert (workdir / 'metrics.jsonl').read_text() == metrics


def test_algorithmic_rnn_smoke_sharded(tmp_path, data_dir, fake_plots):
  config = _config('algorithmic', 'model=rnn,smoke', data_dir, **{'parallel.mode': 'sharded'})
  run.train_and_evaluate(config, tmp_path)
  _check_run(tmp_path)
  assert fake_plots and all(t.startswith('rnn_attention') for t in fake_plots)


def test_algorithmic_transformer_smoke_sharded(tmp_path, data_dir):
  config = _config('algorithmic', 'smoke', data_dir, **{'parallel.mode': 'sharded',
                                                        'eval.attention_examples': 0})
  run.train_and_evaluate(config, tmp_path)


def test_listops_smoke_pmap(tmp_path, data_dir, fake_plots):
  config = _config('listops', 'smoke', data_dir, **{'parallel.mode': 'pmap'})
  run.train_and_evaluate(config, tmp_path)
  done = _check_run(tmp_path)
  assert 0.0 <= done['final']['validation/accuracy'] <= 1.0
  assert {t.split(' layer')[0] for t in fake_plots} == {'encoder_self'}


def test_translation_smoke_reports_bleu(tmp_path, data_dir, fake_plots):
  run.train_and_evaluate(_config('translation', 'model=small,smoke', data_dir), tmp_path)
  done = _check_run(tmp_path)
  assert 0.0 <= done['final']['validation/bleu'] <= 100.0


def test_text_classification_smoke(tmp_path, data_dir, fake_plots):
  run.train_and_evaluate(_config('text_classification', 'smoke', data_dir), tmp_path)
  done = _check_run(tmp_path)
  assert 0.0 <= done['final']['validation/accuracy'] <= 1.0


def test_language_model_smoke_writes_samples(tmp_path, data_dir, fake_plots):
  run.train_and_evaluate(_config('language_model', 'smoke', data_dir), tmp_path)
  done = _check_run(tmp_path)
  assert done['final']['validation/perplexity'] > 1.0
  samples = (tmp_path / 'samples' / 'step_2.txt').read_text().splitlines()
  assert len(samples) == 2 and all(' -> ' in s for s in samples)
  assert {t.split(' layer')[0] for t in fake_plots} == {'decoder_self'}


def _script(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / 'experiments' / name), *args], env=env,
                        input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_train_script_rejects_unknown_arg_key_and_bad_value(tmp_path):
  config = str(ROOT / 'configs' / 'algorithmic.py')
  bad_key = _script('train.py', f'--config={config}:tsk=reverse', f'--workdir={tmp_path}')
  assert bad_key.returncode != 0 and "unknown config arg 'tsk'" in bad_key.stderr
  bad_value = _script('train.py', f'--config={config}:smoke', f'--workdir={tmp_path}',
                      '--config.model.activation=relu6')
  # User errors: one line and status 2, the traceback only with --verbosity=1.
  for out in (bad_key, bad_value):
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert bad_key.stderr.strip().splitlines()[-1].startswith('error: flag --config=')
  assert bad_value.stderr.strip().splitlines()[-1].startswith(
      "error: activation='relu6' is not one of")
  assert not (tmp_path / 'checkpoints').exists()  # failed before any work


def test_decode_script_scores_references(reverse_run, tmp_path):
  workdir, _ = reverse_run
  src = ['3 1 4', '1 5 9 2']
  (tmp_path / 'in.txt').write_text('\n'.join(src) + '\n')
  (tmp_path / 'ref.txt').write_text('4 1 3\n2 9 5 1\n')
  out = _script('decode.py', f'--workdir={workdir}', f'--input={tmp_path / "in.txt"}',
                f'--output={tmp_path / "out.txt"}', f'--references={tmp_path / "ref.txt"}',
                '--method=beam', '--beam_size=2')
  assert out.returncode == 0, out.stderr[-2000:]
  score = json.loads(out.stdout.strip().splitlines()[-1])
  assert score['step'] == LEARN_STEPS and score['num_examples'] == 2
  assert 0.0 <= score['accuracy'] <= 1.0
  lines = (tmp_path / 'out.txt').read_text().splitlines()
  assert len(lines) == 2


def test_decode_script_reads_stdin(reverse_run):
  workdir, _ = reverse_run
  out = _script('decode.py', f'--workdir={workdir}', '--method=greedy', stdin='3 1 4\n')
  assert out.returncode == 0, out.stderr[-2000:]
  assert len(out.stdout.splitlines()) == 1
  bad = _script('decode.py', f'--workdir={workdir / "nope"}', stdin='1\n')
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'config.json does not exist' in bad.stderr


def test_decode_averages_the_last_checkpoints(reverse_run, tmp_path):
  """`load_run(average_last=3)` and `decode.py --average_last=3` use the mean params of the
  last 3 steps; two shifted copies of the run's checkpoint make that mean known."""
  workdir = tmp_path / 'run'
  shutil.copytree(reverse_run[0], workdir)
  single = inference.load_run(workdir)
  tx, _ = optim.make_optimizer(loop.optim_config(single.config))
  abstract = state_lib.abstract_state(single.task.init_params, tx, jax.random.PRNGKey(0))
  ck = ckpt_lib.Checkpointer(workdir / 'checkpoints', async_save=False)
  state = ck.restore(abstract).state
  saved = [jax.tree_util.tree_map(np.asarray, state.params)]
  for step, shift in ((LEARN_STEPS + 1, 0.3), (LEARN_STEPS + 2, -0.9)):
    params = jax.tree_util.tree_map(lambda x, s=shift: x + s, state.params)
    ck.save(step, state.replace(params=params))
    saved.append(jax.tree_util.tree_map(np.asarray, params))
  ck.close()
  averaged = inference.load_run(workdir, average_last=3)
  steps = [LEARN_STEPS, LEARN_STEPS + 1, LEARN_STEPS + 2]
  assert averaged.step == steps[-1] and list(averaged.averaged_steps) == steps
  assert single.averaged_steps == ()
  # float64 sums rounded once to float32: within 1 float32 ulp of the exact mean.
  want = jax.tree_util.tree_map(lambda *x: np.mean(np.stack(x).astype(np.float64), 0), *saved)
  jax.tree_util.tree_map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6),
                         averaged.params, want)
  with pytest.raises(ValueError, match=r'keeps 3 \(steps .*keep_checkpoints'):
    inference.load_run(workdir, average_last=4)
  with pytest.raises(ValueError, match="does not combine with checkpoint='best'"):
    inference.load_run(workdir, checkpoint='best', average_last=2)
  (tmp_path / 'in.txt').write_text('3 1 4\n')
  (tmp_path / 'ref.txt').write_text('4 1 3\n')
  out = _script('decode.py', f'--workdir={workdir}', '--average_last=3', '--method=greedy',
                f'--input={tmp_path / "in.txt"}', f'--references={tmp_path / "ref.txt"}')
  assert out.returncode == 0, out.stderr[-2000:]
  score = json.loads(out.stdout.strip().splitlines()[-1])
  assert score['step'] == steps[-1] and score['averaged_steps'] == steps


def test_predict_batches_by_length_and_returns_input_order(reverse_run):
  workdir, _ = reverse_run
  run = inference.load_run(workdir)
  texts = ['3 1 4 1 5', '2', '7 1', '9 2 6 5', '3', '1 2 3 4 5 6']
  one_by_one = [inference.predict(run, [t], batch_size=1, method='greedy')[0] for t in texts]
  assert inference.predict(run, texts, batch_size=4, method='greedy') == one_by_one

