"""The module and variable names that heatmaps, hooks and decoding read (`models.names`) are
the names the models produce: renaming a module without updating `names.py` fails here, where
it would otherwise make the attention heatmaps silently disappear or beam search copy caches
it should share."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from attn_jax import models
from attn_jax.models import names

VOCAB = 13
INPUTS = jnp.array([[5, 6, 7, 2], [4, 9, 2, 0]], jnp.int32)
TARGETS = jnp.array([[6, 5, 2], [7, 2, 0]], jnp.int32)


def _paths(tree) -> list[tuple[str, ...]]:
  return list(traverse_util.flatten_dict(nn.unbox(tree)))


def _captured(model, *args, **kwargs) -> set[tuple[str, int | str]]:
  """{(attention module, layer index or stack name)} of every sown attention map."""
  params = model.init(jax.random.key(0), *args, **kwargs)['params']
  _, state = model.apply({'params': params}, *args, capture_attention=True,
                         mutable=[names.INTERMEDIATES], **kwargs)
  found = set()
  for path in _paths(state[names.INTERMEDIATES]):
    kind = next(k for k in path if k in names.ATTENTION_MODULES)
    if kind != names.RNN_ATTENTION:
      assert path[-1] == names.ATTENTION_WEIGHTS, path
    layer = next((names.layer_index(k) for k in path if names.layer_index(k) is not None),
                 next((k for k in path if k in names.STACKED), 0))
    found.add((kind, layer))
  return found


@pytest.mark.parametrize('stack', ['unrolled', 'scanned', 'shared'])
def test_transformer_attention_maps_carry_the_names_hooks_read(stack):
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0,
                                  scan_layers=stack == 'scanned', share_layers=stack == 'shared')
  layers = {'unrolled': [0, 1], 'scanned': [names.SCANNED_LAYERS],
            'shared': [names.SHARED_LAYER]}[stack]
  want = {(kind, layer) for kind in (names.ENCODER_SELF, names.DECODER_SELF, names.CROSS)
          for layer in layers}
  assert _captured(models.EncoderDecoder(cfg), INPUTS, TARGETS) == want
  if stack == 'unrolled':
    lm = {(names.DECODER_SELF, i) for i in layers}
    assert _captured(models.DecoderLM(cfg), INPUTS) == lm
    assert _captured(models.EncoderClassifier(cfg), INPUTS) == {
        (names.ENCODER_SELF, i) for i in layers}


def test_rnn_sows_its_attention_under_its_name():
  cfg = models.rnn_config('tiny', vocab_size=VOCAB)
  assert _captured(models.RNNSeq2Seq(cfg), INPUTS, TARGETS) == {(names.RNN_ATTENTION, 0)}


def test_decoding_caches_carry_the_slot_and_cross_cache_names():
  cfg = models.transformer_config('tiny', vocab_size=VOCAB, dropout_rate=0.0)
  model = models.EncoderDecoder(cfg)
  params = model.init(jax.random.key(0), INPUTS, TARGETS)['params']
  fns = model.decoding_fns(params, inputs=INPUTS, max_decode_len=4)
  _, state = fns.start()
  leaves = {path[-1] for path in _paths(state['cache'])}
  assert set(names.SLOT_CACHE) | set(names.CROSS_CACHE) <= leaves


@pytest.mark.parametrize('stack', ['unrolled', 'scanned'])
def test_vit_attention_maps_carry_the_names_hooks_read(stack):
  cfg = models.vit_config('tiny', num_layers=2, d_model=32, d_ff=64,
                          scan_layers=stack == 'scanned')
  layers = [0, 1] if stack == 'unrolled' else [names.SCANNED_LAYERS]
  assert _captured(models.ViT(cfg), jnp.zeros((1, 8, 8, 1))) == {
      (names.ENCODER_SELF, layer) for layer in layers}
