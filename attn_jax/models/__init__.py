"""Flax (linen) models composed from `attn_jax.ops`.

    from attn_jax import models
    cfg = models.transformer_config('base', vocab_size=37_000)
    model = models.EncoderDecoder(cfg)
    logits = model.apply(variables, inputs, targets)               # [b, Lt, vocab] float32
    tokens = models.generate(model, params, inputs=inputs, max_decode_len=64, method='beam')
"""

from attn_jax.models.attention import AdditiveAttention, LuongAttention, MultiHeadAttention
from attn_jax.models.configs import (
    RNN_VARIANTS,
    TRANSFORMER_VARIANTS,
    RNNConfig,
    TransformerConfig,
    rnn_config,
    transformer_config,
)
from attn_jax.models.decoding import DecodeFns, beam_search, filter_logits, generate
from attn_jax.models.layers import Embedder, FeedForward, make_norm, shift_right
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

__all__ = [
    'RNN_VARIANTS', 'TRANSFORMER_VARIANTS', 'AdditiveAttention', 'DecodeFns', 'Decoder',
    'DecoderLM', 'DecoderLayer', 'DecoderStep', 'Embedder', 'Encoder', 'EncoderClassifier',
    'EncoderDecoder', 'EncoderLayer', 'FeedForward', 'LuongAttention', 'MultiHeadAttention',
    'RNNConfig', 'RNNSeq2Seq', 'TransformerConfig', 'beam_search', 'filter_logits', 'generate',
    'make_norm', 'rnn_config', 'shift_right', 'transformer_config',
]
