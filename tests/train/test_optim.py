from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax.train import config as train_config
from attn_jax.train import optim


def _cfg(**kw):
  c = train_config.default_optim()
  c.update(kw)
  return c


def _naive_schedule(kind, step, lr, warmup, total, end_factor):
  w = 1.0 if warmup == 0 else min(1.0, step / warmup)
  if kind == 'constant':
    return lr
  if kind == 'warmup_constant':
    return lr * w
  if kind == 'warmup_rsqrt':
    return lr * w * np.sqrt(max(warmup, 1) / max(step, warmup, 1))
  frac = np.clip((step - warmup) / (total - warmup), 0, 1)
  end = lr * end_factor
  if kind == 'warmup_cosine':
    return w * (end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac)))
  return w * (lr + (end - lr) * frac)


@pytest.mark.parametrize('kind', optim.SCHEDULES)
def test_schedules_match_formulas(kind):
  cfg = _cfg(schedule=kind, learning_rate=0.1, warmup_steps=10, total_steps=50, end_lr_factor=0.1)
  sched = optim.make_schedule(cfg)
  for step in (0, 1, 5, 10, 11, 30, 50, 80):
    want = _naive_schedule(kind, step, 0.1, 10, 50, 0.1)
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-8, err_msg=str(step))


def test_decay_mask_excludes_biases_norm_scales_and_vectors():
  params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)},
            'norm': {'scale': jnp.ones(3)}, 'embedding': jnp.ones((4, 3)), 'v': jnp.ones(3)}
  mask = optim.decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
                  'embedding': True, 'v': False}


def test_adamw_first_step_matches_hand_formula():
  lr, wd, eps = 0.01, 0.1, 1e-8
  tx, _ = optim.make_optimizer(_cfg(schedule='constant', learning_rate=lr, weight_decay=wd,
                                    eps=eps, clip_grad_norm=0.0))
  params = {'w': {'kernel': jnp.array([[1.0, -2.0]]), 'bias': jnp.array([0.5, 0.5])}}
  grads = {'w': {'kernel': jnp.array([[0.3, -0.1]]), 'bias': jnp.array([2.0, -4.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # First Adam step: bias-corrected m/sqrt(v) = g/|g|; decoupled decay only on the kernel.
  k, g = np.array([[1.0, -2.0]]), np.array([[0.3, -0.1]])
  np.testing.assert_allclose(new['w']['kernel'], k - lr * (g / (np.abs(g) + eps) + wd * k),
                             rtol=1e-6)
  np.testing.assert_allclose(new['w']['bias'], np.array([0.5 - lr, 0.5 + lr]), rtol=1e-6)


def test_clipping_by_global_norm():
  tx, _ = optim.make_optimizer(_cfg(name='sgd', momentum=0.0, schedule='constant',
                                    learning_rate=1.0, clip_grad_norm=1.0))
  params = {'a': jnp.zeros(2), 'b': jnp.zeros(1)}
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0])}  # Global norm 5.
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['a'], [-0.6, 0.0], rtol=1e-6)
  np.testing.assert_allclose(updates['b'], [-0.8], rtol=1e-6)


def test_gradient_accumulation_averages_micro_steps():
  tx, _ = optim.make_optimizer(_cfg(name='sgd', momentum=0.0, schedule='constant',
                                    learning_rate=0.5, clip_grad_norm=0.0, grad_accum_steps=2))
  params = jnp.array([1.0, 1.0])
  state = tx.init(params)
  u1, state = tx.update(jnp.array([1.0, 2.0]), state, params)
  p1 = optax.apply_updates(params, u1)
  np.testing.assert_allclose(p1, params)  # No update before the k-th micro-step.
  u2, state = tx.update(jnp.array([3.0, 0.0]), state, p1)
  np.testing.assert_allclose(optax.apply_updates(p1, u2), [1.0 - 0.5 * 2.0, 1.0 - 0.5 * 1.0])


def test_learning_rate_at_counts_updates():
  sched = optim.make_schedule(_cfg(schedule='warmup_constant', learning_rate=1.0,
                                   warmup_steps=4))
  assert float(optim.learning_rate_at(sched, 5, 2)) == pytest.approx(0.5)


@pytest.mark.parametrize('field,value,match', [
    ('name', 'adamx', r"config.optim.name='adamx' is not one of"),
    ('schedule', 'linear', r"config.optim.schedule='linear' is not one of"),
    ('learning_rate', 0.0, r'config.optim.learning_rate=0.0 must be in \(0'),
    ('warmup_steps', -1, r'config.optim.warmup_steps=-1'),
    ('b2', 1.5, r'config.optim.b2=1.5'),
    ('weight_decay', -0.1, r'config.optim.weight_decay'),
    ('grad_accum_steps', 0, r'config.optim.grad_accum_steps=0'),
    ('total_steps', 5, r'config.optim.total_steps=5 must exceed'),
])
def test_bad_config_values_name_the_field(field, value, match):
  cfg = _cfg(schedule='warmup_cosine', warmup_steps=10, total_steps=100)
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(cfg)


def test_adam_with_weight_decay_is_rejected():
  with pytest.raises(ValueError, match='weight_decay=0.1 needs name="adamw"'):
    optim.make_optimizer(_cfg(name='adam', weight_decay=0.1))


def test_schedule_is_jittable():
  sched = optim.make_schedule(_cfg(schedule='warmup_cosine', warmup_steps=2, total_steps=10))
  np.testing.assert_allclose(jax.jit(sched)(jnp.int32(3)), sched(3), rtol=1e-6)
