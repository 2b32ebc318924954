"""The block masks of a stack's self-attention are built once per step and shared by its
layers (`transformer.shared_block_masks`): the same logits and gradients as layers that build
their own, with one build per layer kind instead of one per layer and pass. float32; 1e-5."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import models
from attn_jax.models import transformer
from attn_jax.ops import blockwise

VOCAB = 17


def _builds(monkeypatch):
  """Counts `ops.block_mask` calls, wherever they come from."""
  count = [0]
  real = blockwise.block_mask_lib.block_mask

  def counting(*args, **kwargs):
    count[0] += 1
    return real(*args, **kwargs)

  monkeypatch.setattr(blockwise.block_mask_lib, 'block_mask', counting)  # a layer's own
  monkeypatch.setattr(transformer.ops, 'block_mask', counting)  # the stack's shared one
  return count


def test_layers_share_one_block_mask_per_kind_and_compute_the_same(monkeypatch):
  cfg = models.transformer_config(
      'tiny', vocab_size=VOCAB, dropout_rate=0.0, num_encoder_layers=0, num_decoder_layers=4,
      layer_pattern='LG', attention=dict(sliding_window=3, mask_mod='dilated_2',
                                         implementation='blockwise'))
  model = models.DecoderLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, VOCAB, (2, 24)), jnp.int32)
  segments = jnp.asarray(np.repeat([[1, 2, 3]], 8, axis=1).repeat(2, 0), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))['params']

  def run():
    def loss(params):
      logits = model.apply({'params': params}, tokens, segment_ids=segments)
      return jnp.sum(jnp.sin(logits)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  builds = _builds(monkeypatch)
  (_, shared), shared_grads = run()
  assert builds[0] == 2  # one per layer kind ('L', 'G'), for the forward and backward passes
  monkeypatch.setattr(transformer, 'shared_block_masks', lambda *a, **k: None)
  builds[0] = 0
  (_, own), own_grads = run()
  assert builds[0] == 4  # each layer builds its own
  np.testing.assert_allclose(shared, own, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), shared_grads,
               own_grads)


def test_short_sequences_on_the_dense_path_build_none():
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, num_encoder_layers=0)
  assert transformer.shared_block_masks(
      cfg, causal=True, shape=(2, 16), dtype=jnp.float32, mask=None, segment_ids=None,
      num_layers=2, train=False) is None
