"""Configs: named variants, validation before compilation, the paper's parameter count."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn_jax import models


@pytest.mark.parametrize('overrides, field', [
    (dict(d_model=100, attention=dict(num_heads=8)), 'd_model'),
    (dict(attention=dict(num_heads=8, num_kv_heads=3)), 'num_kv_heads'),
    (dict(activation='tanh'), 'activation'),
    (dict(norm='batchnorm'), 'norm'),
    (dict(positional='xpos'), 'positional'),
    (dict(dropout_rate=1.5), 'dropout_rate'),
    (dict(share_embeddings=True, output_vocab_size=7), 'share_embeddings'),
    (dict(dmodel=512), 'dmodel'),  # a typo'd field must fail, not be ignored
    (dict(layer_pattern='LX', attention=dict(sliding_window=4)), 'layer_pattern'),
    (dict(layer_pattern='LG'), 'sliding_window is None'),
    (dict(layer_pattern='GN', positional='sinusoidal'), 'NoPE'),
    (dict(layer_pattern='LG', attention=dict(sliding_window=4), scan_layers=True),
     'scan_layers'),
    (dict(attention=dict(logit_softcap=0.0)), 'logit_softcap'),
    (dict(attention=dict(kind='linear', sinks=True)), 'sinks'),
    (dict(attention=dict(dropout=0.1)), r"unknown AttentionConfig field\(s\) \['dropout'\]"),
    (dict(num_kv_heads=2), r'attention options: pass attention=dict\(num_kv_heads'),
])
def test_bad_transformer_config_raises_naming_the_field(overrides, field):
  # Raised by the (pure Python) config itself, so before any model is traced or compiled.
  with pytest.raises(ValueError, match=field):
    models.transformer_config('base', **overrides)


def test_mask_and_score_mods_are_resolved_by_name_or_import_path():
  from attn_jax import ops
  from attn_jax.models.modifiers import MASK_MODS, resolve_mod
  assert resolve_mod('', 'mask_mod') is None
  assert resolve_mod('dilated_2', 'mask_mod') is MASK_MODS['dilated_2']
  window = resolve_mod('attn_jax.ops.mask_mods:sliding_window(4, right=1)', 'mask_mod')
  assert window == ops.mask_mods.sliding_window(4, 1)
  soft = resolve_mod('attn_jax.ops.score_mods:soft_cap(30.0)', 'score_mod')
  assert float(soft(jnp.float32(60.0), 0, 0, 0, 0)) == pytest.approx(30 * np.tanh(2.0))
  assert resolve_mod(MASK_MODS['global_1'], 'mask_mod') is MASK_MODS['global_1']
  with pytest.raises(ValueError, match="mask_mod='dilated_3' is not one of"):
    resolve_mod('dilated_3', 'mask_mod')
  with pytest.raises(ValueError, match='cannot be imported'):
    resolve_mod('attn_jax.ops.mask_mods:nope', 'mask_mod')
  with pytest.raises(ValueError, match='literal arguments'):
    resolve_mod('attn_jax.ops.mask_mods:chunked(size)', 'mask_mod')


@pytest.mark.parametrize('name, kind, says', [
    # A factory where its product is due: the message shows how to pass the arguments.
    ('attn_jax.ops.mask_mods:chunked', 'mask_mod',
     r"takes \(chunk_size\).*factory.*'attn_jax.ops.mask_mods:chunked\(<arguments>\)'"),
    ('attn_jax.ops.score_mods:soft_cap', 'score_mod', r'takes \(cap\).*soft_cap\(<arguments>\)'),
    ('attn_jax.ops.mask_mods:causal', 'mask_mod', r'takes \(\).*causal\(<arguments>\)'),
    # A mask function where a score function is due is refused too.
    ('dilated_2', 'score_mod', 'is not one of'),
])
def test_resolve_mod_rejects_a_factory_and_says_how_to_call_it(name, kind, says):
  from attn_jax.models.modifiers import resolve_mod
  with pytest.raises(ValueError, match=says):
    resolve_mod(name, kind)
  with pytest.raises(ValueError, match='factory'):
    resolve_mod(models.attention.ops.mask_mods.chunked, 'mask_mod')


def test_unknown_variants_and_rnn_fields_raise():
  with pytest.raises(ValueError, match='huge'):
    models.transformer_config('huge')
  with pytest.raises(ValueError, match='huge'):
    models.rnn_config('huge')
  with pytest.raises(ValueError, match='cell'):
    models.rnn_config('tiny', cell='rnn')
  with pytest.raises(ValueError, match='attention'):
    models.rnn_config('tiny', attention='cosine')


def test_variants_are_ordered_by_size():
  sizes = [models.transformer_config(v).d_model for v in ('tiny', 'small', 'base', 'big')]
  assert sizes == sorted(sizes)
  base = models.transformer_config('base')
  assert (base.d_model, base.num_heads, base.d_ff, base.num_encoder_layers) == (512, 8, 2048, 6)
  assert base.norm_position == 'post' and base.kv_heads == 8 and base.head_dim == 64


def test_base_encoder_decoder_has_the_papers_65m_parameters():
  """Vaswani et al. 2017, Table 3: base model, shared 37k BPE vocabulary, ~65M params."""
  cfg = models.transformer_config('base', vocab_size=37_000)
  x = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: models.EncoderDecoder(cfg).init(jax.random.key(0), x, x))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(nn.unbox(shapes['params'])))
  assert abs(count - 65e6) / 65e6 < 0.05, count
