"""The names of modules and variables that code outside a model reads by name.

Attention heatmaps find their maps by the attention modules' names in the sown
`intermediates`; decoding and beam search find the cache variables by theirs; both walk stacks
of layers by the stack names. They import these constants rather than repeating the strings,
and `tests/models/test_names.py` fails when a model stops producing a name listed here.

JAX-free: config and plotting code may import it.
"""

from __future__ import annotations

# Attention modules of the Transformer layers and the RNN decoder, as named in the parameter
# and intermediates trees. Plots and hooks key their labels on these.
ENCODER_SELF = 'encoder_self'
DECODER_SELF = 'decoder_self'
CROSS = 'cross'
RNN_ATTENTION = 'rnn_attention'  # sown by RNNSeq2Seq itself: [batch, target, source]
ATTENTION_MODULES = (ENCODER_SELF, DECODER_SELF, CROSS, RNN_ATTENTION)

# The `intermediates` entry a MultiHeadAttention sows its float32 weights
# `[batch, heads, q_len, kv_len]` into when capturing.
ATTENTION_WEIGHTS = 'attention_weights'
INTERMEDIATES = 'intermediates'

# Layer stacks: unrolled layers are `layer_<i>`; `nn.scan` stacks (whose variables carry a
# leading [layers] axis) are `layers`, or `shared_layer` for one layer applied to the whole
# stack (ALBERT).
LAYER_PREFIX = 'layer_'
SCANNED_LAYERS = 'layers'
SHARED_LAYER = 'shared_layer'
STACKED = (SCANNED_LAYERS, SHARED_LAYER)

# Cache variables of a decoding self-attention layer that hold one entry per slot,
# `[batch, slots, ...]`: decoding reads (and beam search reorders) only their filled slots.
SLOT_CACHE = ('cached_key', 'cached_value', 'cached_segment', 'cached_position')
# Cache variables of a decoding cross-attention layer, `[source batch, kv_len, ...]`: the
# projected source, shared by every beam of a row (beam search neither copies nor reorders
# them).
CROSS_CACHE = ('cross_key', 'cross_value')


# The mesh axis that context parallelism splits sequences over (train.parallel.SEQUENCE_AXIS;
# tests/models/test_sequence_parallel.py keeps the two equal).
SEQUENCE_AXIS = 'sequence'


def layer_name(index: int) -> str:
  """The name of unrolled layer `index` of a stack."""
  return f'{LAYER_PREFIX}{index}'


def layer_index(name: str) -> int | None:
  """`layer_<i>` -> i; None for any other name."""
  if name.startswith(LAYER_PREFIX) and name[len(LAYER_PREFIX):].isdigit():
    return int(name[len(LAYER_PREFIX):])
  return None
