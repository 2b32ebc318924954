"""State creation and the pure train/eval step, against a hand-written SGD update."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.train import config as train_config
from attn_jax.train import optim
from attn_jax.train import state as state_lib
from attn_jax.train import step as step_lib
from tests.train import tiny


def _optim(**kw):
  c = train_config.default_optim()
  c.update(dict(name='sgd', momentum=0.0, schedule='constant', learning_rate=0.5,
                clip_grad_norm=0.0))
  c.update(kw)
  return optim.make_optimizer(c)


def test_create_state_shapes_count_and_dtype():
  init_params, _ = tiny.make_task()
  tx, _ = _optim(name='adamw')
  rng = jax.random.PRNGKey(0)
  abstract = state_lib.abstract_state(init_params, tx, rng)
  state = state_lib.create_train_state(init_params, tx, rng)
  want = (tiny.VOCAB * tiny.EMBED + tiny.EMBED * tiny.HIDDEN + tiny.HIDDEN + 2 * tiny.HIDDEN
          + tiny.HIDDEN * tiny.VOCAB + tiny.VOCAB)
  assert state_lib.param_count(state.params) == want
  assert state_lib.param_count(state_lib.abstract_params(init_params, rng)) == want
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(state)
  for a, x in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(state),
                  strict=True):
    assert (a.shape, a.dtype) == (x.shape, x.dtype)
  assert int(state.step) == 0


def test_typed_key_is_stored_as_raw_key_data():
  tx, _ = _optim()
  state = state_lib.init_state(lambda r: {'w': jax.random.normal(r, (2,))}, tx,
                               jax.random.key(0))
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)


def test_bf16_params_rejected_before_allocation():
  tx, _ = _optim()
  with pytest.raises(ValueError, match=r"params must be float32.*\['w'\]"):
    state_lib.create_train_state(lambda r: {'w': jnp.zeros(3, jnp.bfloat16)}, tx,
                                 jax.random.PRNGKey(0))


def _reference_loss(params, batch, dropout_rng=None):
  # Independent of attn_jax.train.losses: optax's integer-label cross-entropy.
  model = tiny.TinyModel(dropout_rate=0.5)
  train = dropout_rng is not None
  logits = model.apply({'params': params}, batch['inputs'], train=train,
                       rngs={'dropout': dropout_rng} if train else None)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  w = (batch['targets'] != 0).astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.sum(w)


@pytest.fixture(scope='module')
def sgd_dropout():
  """One state and one compiled SGD step (dropout 0.5) shared by the tests below."""
  init_params, loss_fn = tiny.make_task(dropout_rate=0.5)
  tx, sched = _optim()
  state = state_lib.create_train_state(init_params, tx, jax.random.PRNGKey(1))
  step = jax.jit(chex.assert_max_traces(step_lib.make_train_step(loss_fn, tx, sched), n=1))
  return state, step, loss_fn


def test_train_step_matches_hand_sgd_and_reports_metrics(sgd_dropout):
  state, step, _ = sgd_dropout
  batch = tiny.make_batch(0, 0)
  new_state, metrics = step(state, batch)
  # Reference: the same dropout mask (same model, rng = fold_in(state.rng, step 0)).
  rng = jax.random.fold_in(state.rng, 0)
  loss, grads = jax.jit(jax.value_and_grad(_reference_loss))(state.params, batch, rng)
  want = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, state.params, grads)
  chex.assert_trees_all_close(new_state.params, want, rtol=1e-5, atol=1e-6)
  summary = {k: float(s) / float(c) for k, (s, c) in metrics.items()}
  assert summary['loss'] == pytest.approx(float(loss), rel=1e-5)
  assert summary['grad_norm'] == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
  assert summary['param_norm'] == pytest.approx(float(optax.tree.norm(state.params)), rel=1e-5)
  assert summary['learning_rate'] == pytest.approx(0.5)
  assert summary['nonfinite'] == 0.0
  assert float(metrics['loss'][1]) == float((batch['targets'] != 0).sum())
  assert int(new_state.step) == 1


def test_dropout_rng_folded_with_step(sgd_dropout):
  state, step, _ = sgd_dropout
  batch = tiny.make_batch(0, 0)
  loss = lambda s: float(step(s, batch)[1]['loss'][0])  # noqa: E731
  assert loss(state) == loss(state)  # Same step number -> same dropout mask.
  assert loss(state) != loss(state.replace(step=jnp.int32(1)))


def test_training_reduces_loss_without_recompiling(sgd_dropout):
  state, step, _ = sgd_dropout  # assert_max_traces(n=1) covers all tests sharing `step`.
  losses = []
  for i in range(30):
    state, m = step(state, tiny.make_batch(0, i))
    losses.append(float(m['loss'][0] / m['loss'][1]))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_eval_step_uses_train_false_and_sums(sgd_dropout):
  state, _, loss_fn = sgd_dropout
  batch = tiny.make_batch(0, 0)
  m = jax.jit(step_lib.make_eval_step(loss_fn))(state, batch)
  want = jax.jit(_reference_loss)(state.params, batch)
  assert float(m['loss'][0] / m['loss'][1]) == pytest.approx(float(want), rel=1e-5)


def _scalar_task():
  def loss_fn(params, batch, rng, train):
    del rng, train
    loss = jnp.sum(batch['scale'] * params['w'] ** 2)
    return loss, {'loss': (loss, jnp.float32(1.0))}
  return loss_fn


@pytest.mark.parametrize('mode', step_lib.NONFINITE_MODES)
def test_nonfinite_step_is_skipped(mode):
  tx, sched = _optim(name='adamw', grad_accum_steps=2)
  state = state_lib.create_train_state(lambda r: {'w': jnp.ones((2, 2))}, tx,
                                       jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(_scalar_task(), tx, sched, grad_accum_steps=2,
                                          nonfinite=mode))
  bad, m = step(state, {'scale': jnp.float32(np.nan)})
  assert float(m['nonfinite'][0]) == 1.0 and int(bad.step) == 1
  chex.assert_trees_all_equal(bad.params, state.params)
  chex.assert_trees_all_equal(bad.opt_state, state.opt_state)
  good, m = step(bad, {'scale': jnp.float32(1.0)})
  assert float(m['nonfinite'][0]) == 0.0
  chex.assert_tree_all_finite(good.opt_state)


def test_bf16_compute_keeps_float32_params_and_opt_state():
  init_params, loss_fn = tiny.make_task(dtype=jnp.bfloat16)
  tx, sched = _optim(name='adamw')
  state = state_lib.create_train_state(init_params, tx, jax.random.PRNGKey(0))
  new_state, _ = jax.jit(step_lib.make_train_step(loss_fn, tx, sched))(state,
                                                                       tiny.make_batch(0, 0))
  for x in jax.tree_util.tree_leaves((new_state.params, new_state.opt_state)):
    assert x.dtype in (jnp.float32, jnp.int32), x.dtype


def test_loss_fn_without_loss_metric_is_rejected():
  tx, sched = _optim()
  state = state_lib.create_train_state(lambda r: {'w': jnp.ones(2)}, tx, jax.random.PRNGKey(0))
  bad_fn = lambda p, b, r, t: (jnp.sum(p['w']), {'acc': (1.0, 1.0)})  # noqa: E731
  with pytest.raises(ValueError, match=r"metrics\['loss'\] = \(sum, count\).*\['acc'\]"):
    step_lib.make_train_step(bad_fn, tx, sched)(state, {})
  with pytest.raises(ValueError, match="nonfinite='ignore'"):
    step_lib.make_train_step(bad_fn, tx, sched, nonfinite='ignore')



def test_grad_accumulation_through_the_step():
  tx, sched = _optim(learning_rate=0.1, grad_accum_steps=2, schedule='warmup_constant',
                     warmup_steps=4)
  state = state_lib.create_train_state(lambda r: {'w': jnp.ones((2, 2))}, tx,
                                       jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(_scalar_task(), tx, sched, grad_accum_steps=2))
  s1, m1 = step(state, {'scale': jnp.float32(1.0)})
  chex.assert_trees_all_equal(s1.params, state.params)  # Accumulating, not yet applied.
  s2, m2 = step(s1, {'scale': jnp.float32(3.0)})
  # The first update has lr = schedule(0) = 0 under warmup, so params are still unchanged.
  chex.assert_trees_all_equal(s2.params, state.params)
  s3, _ = step(s2, {'scale': jnp.float32(1.0)})
  s4, m4 = step(s3, {'scale': jnp.float32(3.0)})
  # Second update: lr = 0.1 * 1/4, mean gradient mean(2 * 1 * w, 2 * 3 * w) = 4w at w = 1.
  np.testing.assert_allclose(s4.params['w'], np.full((2, 2), 1.0 - 0.1 * 0.25 * 4.0), rtol=1e-6)
  lrs = [float(m['learning_rate'][0]) for m in (m1, m2, m4)]
  assert lrs == pytest.approx([0.0, 0.0, 0.025])  # schedule(step // 2): updates 0, 0, 1.
