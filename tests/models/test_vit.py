"""The Vision Transformer: patch embedding against a convolution and a loop, every position
kind and pooling, the class token, permutation behaviour, RoPE-2D inside attention, attention
maps, every attention option, bad input, and a tiny ViT learning the real digits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attn_jax import models, ops
from attn_jax.data import digits, images
from attn_jax.models import MultiHeadAttention, vit

POSITIONALS = ('learned', 'sinusoidal_2d', 'rope_2d', 'none')


def _cfg(**overrides):
  # One layer and d_model 32 unless a test needs more: compiles dominate these tests.
  return models.vit_config('tiny', **dict(dict(num_layers=1, d_model=32, d_ff=64), **overrides))


def _images(batch=2, shape=(8, 8, 1), seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, *shape))


def _init(model, images):
  return nn.unbox(model.init(jax.random.key(1), images))['params']


def test_config_rejects_bad_values_naming_them():
  with pytest.raises(ValueError, match=r'patch_size=3 does not divide image_size=\(8, 8\)'):
    models.vit_config('tiny', patch_size=3)
  with pytest.raises(ValueError, match='rope_2d needs head_dim divisible by 4, got 6'):
    models.vit_config('tiny', d_model=24, positional='rope_2d')
  with pytest.raises(ValueError, match='sinusoidal_2d needs d_model divisible by 4, got 30'):
    models.vit_config('tiny', d_model=30, positional='sinusoidal_2d', attention=dict(num_heads=2))
  with pytest.raises(ValueError, match=r"positional='rope' is not one of"):
    models.vit_config('tiny', positional='rope')
  with pytest.raises(ValueError, match=r'image_size must be \(height, width\).*\(8,\)'):
    models.vit_config('tiny', image_size=(8,))
  with pytest.raises(ValueError, match=r'attention options: pass attention=dict\(num_heads'):
    models.vit_config('tiny', num_heads=2)
  with pytest.raises(ValueError, match="'N' layers.*rope_2d"):
    models.vit_config('tiny', layer_pattern='NG')
  with pytest.raises(ValueError, match="positional='rope_2d' is not one of"):
    models.transformer_config('tiny', positional='rope_2d')  # 2-D positions are the ViT's
  base = models.vit_config('base')
  assert (base.d_model, base.num_layers, base.num_heads, base.patch_size, base.grid) == (
      768, 12, 12, 16, (14, 14))


def test_bad_images_raise_naming_the_shapes():
  model = models.ViT(_cfg())
  with pytest.raises(ValueError, match=r'images must be \[batch, 8, 8, 1\].*got \(2, 8, 8, 3\)'):
    model.init(jax.random.key(0), _images(shape=(8, 8, 3)))
  with pytest.raises(ValueError, match=r'got \(8, 8, 1\)'):
    model.init(jax.random.key(0), jnp.zeros((8, 8, 1)))


def test_patch_embedding_is_a_strided_convolution_and_a_matmul_per_patch():
  cfg = _cfg(image_size=(8, 12), channels=3, patch_size=4)
  images = _images(shape=(8, 12, 3))
  module = vit.PatchEmbedding(cfg)
  params = _init(module, images)
  got = module.apply({'params': params}, images)
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  assert got.shape == (2, 6, 32) and kernel.shape == (4, 4, 3, 32)
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(got, conv.reshape(2, 6, 32) + bias, atol=1e-5)
  x = np.asarray(images)
  for n, (r, c) in enumerate([(r, c) for r in range(2) for c in range(3)]):
    patch = x[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4, :]  # [b, 4, 4, 3]
    want = np.einsum('bijc,ijcd->bd', patch, kernel) + bias
    np.testing.assert_allclose(got[:, n], want, atol=1e-5)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_shapes_dtypes_and_parameters_of_every_position_kind(pooling):
  images = jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.float32)
  for positional in POSITIONALS:
    model = models.ViT(_cfg(positional=positional, pooling=pooling, dtype='bfloat16'))
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))['params']
    assert ('position' in params) == (positional == 'learned')
    if positional == 'learned':
      assert params['position'].shape == (16, 32)  # a row per patch, none for the class token
    assert ('cls' in params) == (pooling == 'cls')
    assert params['patch_embedding']['kernel'].dtype == jnp.float32  # params stay float32
    logits = jax.eval_shape(model.apply, {'params': params}, images)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def _permute_patches(images, perm, p):
  """The image whose patch i is patch perm[i] of `images`."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, p, p, c)[:, perm].reshape(b, h // p, w // p, p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


@pytest.mark.parametrize('positional,pooling', [('none', 'mean'), ('none', 'cls'),
                                                ('learned', 'mean'), ('sinusoidal_2d', 'mean'),
                                                ('rope_2d', 'cls')])
def test_without_positions_a_patch_permutation_leaves_the_logits_unchanged(positional, pooling):
  images = _images(batch=1)
  perm = np.random.default_rng(0).permutation(16)
  both = jnp.concatenate([images, _permute_patches(images, perm, 2)])
  np.testing.assert_array_equal(ops.patchify(both, 2)[1], ops.patchify(images, 2)[0][perm])
  model = models.ViT(_cfg(positional=positional, pooling=pooling))
  logits = model.apply({'params': _init(model, images)}, both)
  if positional == 'none':  # a set of patches: attention and both poolings are order-blind
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
  else:
    assert np.abs(logits[1] - logits[0]).max() > 1e-3


def test_class_token_is_a_learned_extra_token_that_the_head_reads():
  cfg = _cfg(num_layers=2)
  model, images = models.ViT(cfg), _images()
  params = _init(model, images)
  logits, state = model.apply({'params': params}, images, capture_attention=True,
                              mutable=['intermediates'])
  weights = vit.attention_weights(state['intermediates'])
  assert [w.shape for w in weights] == [(2, 4, 17, 17)] * 2  # 16 patches + the class token
  moved = dict(params, cls=params['cls'] + jax.random.normal(jax.random.key(2), (32,)))
  assert np.abs(model.apply({'params': moved}, images) - logits).max() > 1e-3
  # The class token reads the patches: changing one pixel changes the logits.
  poked = images.at[:, 7, 7, 0].add(3.0)
  assert np.abs(model.apply({'params': params}, poked) - logits).max() > 1e-4


def test_rope_2d_in_attention_rotates_by_row_and_column():
  attention = models.AttentionConfig(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  rope = MultiHeadAttention(attention, positional='rope_2d')
  plain = MultiHeadAttention(attention)
  grid = ops.grid_positions(2, 3)
  params = nn.unbox(rope.init(jax.random.key(1), x, positions=grid))
  at_origin = rope.apply(params, x, positions=jnp.zeros((6, 2), jnp.int32))
  np.testing.assert_allclose(at_origin, plain.apply(params, x), atol=1e-6)  # identity rotation
  rotated = rope.apply(params, x, positions=grid)
  assert np.abs(rotated - at_origin).max() > 1e-3
  # Moving every token by the same 2-D offset changes no score, hence no output.
  np.testing.assert_allclose(rope.apply(params, x, positions=grid + jnp.array([3, 5])), rotated,
                             atol=1e-5)
  with pytest.raises(ValueError, match='needs positions'):
    rope.apply(params, x)
  with pytest.raises(ValueError, match='no incremental decoding'):
    MultiHeadAttention(attention, positional='rope_2d', is_causal=True).init(
        jax.random.key(0), x, positions=grid, decode=True)


def test_attention_maps_over_patches():
  cfg = _cfg(num_layers=2, positional='rope_2d')
  model, images = models.ViT(cfg), _images()
  _, state = model.apply({'params': _init(model, images)}, images, capture_attention=True,
                         mutable=['intermediates'])
  weights = vit.attention_weights(state['intermediates'])
  assert len(weights) == 2 and all(w.shape == (2, 4, 17, 17) for w in weights)
  np.testing.assert_allclose(ops.attention_rollout(weights).sum(-1), 1.0, atol=1e-5)
  for method in ('rollout', 'last'):
    maps = vit.patch_attention_map(weights, cfg, method)
    assert maps.shape == (2, 4, 4) and (maps >= 0).all()
    np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match='capture_attention=True'):
    vit.attention_weights({})


def test_attention_weights_reads_stacked_layers_in_order():
  """`nn.scan` / shared stacks sow one [layers, ...] array (`test_names` checks the paths)."""
  w = np.arange(3 * 2 * 5 * 5, dtype=np.float32).reshape(3, 1, 2, 5, 5)
  for stack in ('layers', 'shared_layer'):
    got = vit.attention_weights({stack: {'encoder_self': {'attention_weights': (w,)}}})
    assert len(got) == 3 and all((g == w[i]).all() for i, g in enumerate(got))
  unrolled = {f'layer_{i}': {'encoder_self': {'attention_weights': (w[i],)}} for i in (2, 0, 1)}
  assert all((g == w[i]).all() for i, g in enumerate(vit.attention_weights(unrolled)))


@pytest.mark.parametrize('options', [
    dict(attention=dict(num_kv_heads=2, qk_norm=True, sinks=True, logit_softcap=20.0)),
    dict(attention=dict(modifiers='temperature', dropout_rate=0.1), positional='rope_2d'),
    dict(attention=dict(kind='linear')),
    dict(attention=dict(sliding_window=3), layer_pattern='LN', positional='rope_2d'),
    dict(attention=dict(shared_qk=True, value_projection=False)),
    dict(attention=dict(aggregation='backward', share_head_projections=True)),
    dict(attention=dict(implementation='blockwise'), share_layers=True, remat=True),
], ids=['gqa_qknorm_sinks_softcap', 'temperature_dropout_rope2d', 'linear',
        'local_and_nope', 'shared_qk', 'backward', 'blockwise_shared_remat'])
def test_every_attention_option_builds_a_vit(options):
  """The layers are the text encoder's, so each option traces through a ViT (numerics of the
  options are the attention tests')."""
  model = models.ViT(_cfg(num_layers=2, **options))
  images = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  rngs = {'dropout': jax.random.key(1)}
  logits = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, train=True, rngs=rngs),
                          params, images)
  assert logits.shape == (2, 10)


def test_a_tiny_vit_learns_the_real_digits_in_a_few_steps():
  # scikit-learn's arrays normalized as the pipeline does (tests/data/test_images.py covers the
  # pipeline itself; building its TFDS copy here would double this test's time).
  pixels, labels = digits.load()
  spec = images.spec_for('digits')
  x = images.normalize(pixels, spec.mean, spec.std)
  order = np.random.default_rng(0).permutation(len(x))
  model = models.ViT(_cfg(num_layers=2))
  params = _init(model, jnp.zeros((1, 8, 8, 1)))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({'params': p}, batch['image'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for i in range(25):
    rows = order[64 * i:64 * (i + 1)]
    params, opt_state, loss = step(params, opt_state, {'image': x[rows], 'label': labels[rows]})
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5, losses
