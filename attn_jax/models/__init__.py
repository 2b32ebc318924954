"""Flax (linen) models composed from `attn_jax.ops`.

    from attn_jax import models
    cfg = models.transformer_config('base', vocab_size=37_000)
    model = models.EncoderDecoder(cfg)
    logits = model.apply(variables, inputs, targets)               # [b, Lt, vocab] float32
    tokens = models.generate(model, params, inputs=inputs, max_decode_len=64, method='beam')
    vit = models.ViT(models.vit_config('tiny'))                    # images [b, 8, 8, 1]

Names are exported lazily: `attn_jax.models.configs` (the config dataclasses) imports no JAX,
so config files can use it without paying for Flax.
"""

from typing import TYPE_CHECKING

from attn_jax import _lazy

_EXPORTS = {
    'AdditiveAttention': 'attention', 'LuongAttention': 'attention',
    'MultiHeadAttention': 'attention',
    'AttentionConfig': 'configs',
    'RNN_VARIANTS': 'configs', 'TRANSFORMER_VARIANTS': 'configs', 'RNNConfig': 'configs',
    'TransformerConfig': 'configs', 'rnn_config': 'configs', 'transformer_config': 'configs',
    'DecodeFns': 'decoding', 'beam_search': 'decoding', 'filter_logits': 'decoding',
    'generate': 'decoding',
    'LayerInfo': 'modifiers', 'Modifier': 'modifiers', 'ParamSpec': 'modifiers',
    'Embedder': 'layers', 'FeedForward': 'layers', 'make_norm': 'layers',
    'shift_right': 'layers',
    'DecoderStep': 'rnn', 'RNNSeq2Seq': 'rnn',
    'Decoder': 'transformer', 'DecoderLayer': 'transformer', 'DecoderLM': 'transformer',
    'Encoder': 'transformer', 'EncoderClassifier': 'transformer',
    'EncoderDecoder': 'transformer', 'EncoderLayer': 'transformer',
    'VIT_VARIANTS': 'configs', 'ViTConfig': 'configs', 'vit_config': 'configs',
    'PatchEmbedding': 'vit', 'ViT': 'vit', 'patch_attention_map': 'vit',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # Static analysers see the real names.
  from attn_jax.models.attention import AdditiveAttention, LuongAttention, MultiHeadAttention
  from attn_jax.models.configs import (
      RNN_VARIANTS,
      TRANSFORMER_VARIANTS,
      VIT_VARIANTS,
      AttentionConfig,
      RNNConfig,
      TransformerConfig,
      ViTConfig,
      rnn_config,
      transformer_config,
      vit_config,
  )
  from attn_jax.models.decoding import DecodeFns, beam_search, filter_logits, generate
  from attn_jax.models.layers import Embedder, FeedForward, make_norm, shift_right
  from attn_jax.models.modifiers import LayerInfo, Modifier, ParamSpec
  from attn_jax.models.rnn import DecoderStep, RNNSeq2Seq
  from attn_jax.models.transformer import (
      Decoder,
      DecoderLayer,
      DecoderLM,
      Encoder,
      EncoderClassifier,
      EncoderDecoder,
      EncoderLayer,
  )
  from attn_jax.models.vit import PatchEmbedding, ViT, patch_attention_map
