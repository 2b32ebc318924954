"""RNN encoder-decoder with attention (Bahdanau et al. 2014; Luong et al. 2015).

Encoder: embedding + bidirectional LSTM/GRU (`nn.Bidirectional` of `nn.RNN`s, given each
row's true length so the backward direction starts at the last real token). Its outputs
are projected to the decoder size once; the decoder's initial state is a tanh layer over
both directions' final states.

Decoder step (`DecoderStep`), one token at a time, by `config.attention`:
  'additive' (Bahdanau): context from the previous state `s_{t-1}`, `s_t = cell(s_{t-1},
      [y_{t-1}; c_t])`, output `tanh(W [s_t; c_t])`.
  'dot' / 'general' (Luong): `h_t = cell(h_{t-1}, [y_{t-1}; o_{t-1}])` (input feeding, or
      `y_{t-1}` alone), context from `h_t`, attentional output `o_t = tanh(W [c_t; h_t])`.
  'none' (ablation): `h_t = cell(h_{t-1}, y_{t-1})`, output `h_t`; the source reaches the
      decoder only through its initial state (Sutskever et al. 2014).
Teacher forcing scans the same `DecoderStep` over time with `nn.scan`; decoding calls it
once per token, so both share one set of parameters.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn_jax.models import names
from attn_jax.models.attention import AdditiveAttention, LuongAttention
from attn_jax.models.configs import RNNConfig
from attn_jax.models.decoding import DecodeFns
from attn_jax.models.layers import Dropout, shift_right
from attn_jax.tokens import BOS_ID, PAD_ID


def _cell(cfg: RNNConfig, name: str | None = None) -> nn.Module:
  if cfg.cell == 'lstm':
    return nn.OptimizedLSTMCell(cfg.hidden_dim, dtype=cfg.compute_dtype, name=name)
  return nn.GRUCell(cfg.hidden_dim, dtype=cfg.compute_dtype, name=name)


def _hidden(cfg: RNNConfig, carry):
  """The hidden state `h` of a cell carry (`(c, h)` for the LSTM)."""
  return carry[1] if cfg.cell == 'lstm' else carry


class DecoderStep(nn.Module):
  """One decoder time step; see the module docstring for the wiring."""
  config: RNNConfig

  @nn.compact
  def __call__(self, carry, y_emb, memory, mask, deterministic: bool = True):
    """
    Args:
      carry: `(cell_state, feed)`; `feed` `[batch, hidden]` is the previous attentional
        output (input feeding).
      y_emb: previous target token's embedding `[batch, embed_dim]`.
      memory: projected encoder outputs `[batch, src_len, hidden]`.
      mask: bool `[batch, src_len]`, True = real source token.

    Returns:
      `(carry, (output [batch, hidden], weights float32 [batch, src_len]))`.
    """
    cfg = self.config
    cell_state, feed = carry
    cell = _cell(cfg, 'cell')
    out_proj = nn.Dense(cfg.hidden_dim, dtype=cfg.compute_dtype, name='attentional')
    weights = jnp.zeros(mask.shape, jnp.float32)
    if cfg.attention == 'none':
      cell_state, h = cell(cell_state, y_emb)
      output = h
    elif cfg.attention == 'additive':
      attn = AdditiveAttention(cfg.attention_dim, name='attention')
      context, weights = attn(_hidden(cfg, cell_state), memory, mask)
      context = context.astype(y_emb.dtype)
      cell_state, h = cell(cell_state, jnp.concatenate([y_emb, context], axis=-1))
      output = jnp.tanh(out_proj(jnp.concatenate([h, context], axis=-1)))
    else:
      x = jnp.concatenate([y_emb, feed], axis=-1) if cfg.input_feeding else y_emb
      cell_state, h = cell(cell_state, x)
      context, weights = LuongAttention(cfg.attention, name='attention')(h, memory, mask)
      output = jnp.tanh(out_proj(jnp.concatenate([context.astype(h.dtype), h], axis=-1)))
    output = output.astype(feed.dtype)
    return (cell_state, output), (output, weights)


class RNNSeq2Seq(nn.Module):
  """`RNNSeq2Seq(config)(inputs [b, Ls], targets [b, Lt])` -> float32 `[b, Lt, vocab]`."""
  config: RNNConfig

  def setup(self):
    cfg = self.config
    embed = functools.partial(nn.Embed, features=cfg.embed_dim, dtype=cfg.compute_dtype)
    self.source_embed = embed(cfg.vocab_size)
    self.target_embed = embed(cfg.target_vocab_size)
    self.encoder = nn.Bidirectional(nn.RNN(_cell(cfg)), nn.RNN(_cell(cfg)), return_carry=True)
    self.memory_proj = nn.Dense(cfg.hidden_dim, dtype=cfg.compute_dtype)
    self.bridge_h = nn.Dense(cfg.hidden_dim, dtype=cfg.compute_dtype)
    if cfg.cell == 'lstm':
      self.bridge_c = nn.Dense(cfg.hidden_dim, dtype=cfg.compute_dtype)
    self.step = DecoderStep(cfg)
    self.logits = nn.Dense(cfg.target_vocab_size)
    self.dropout = Dropout(cfg.dropout_rate)

  def encode(self, inputs: jax.Array, *, train: bool = False):
    """`inputs` int `[batch, Ls]` -> dict of memory `[batch, Ls, hidden]`, mask
    `[batch, Ls]` and the decoder's initial `(cell_state, feed)`."""
    cfg = self.config
    if inputs.ndim != 2:
      raise ValueError(f'inputs must be [batch, length], got {inputs.shape}')
    mask = inputs != PAD_ID
    x = self.dropout(self.source_embed(inputs), deterministic=not train)
    (fwd, bwd), outputs = self.encoder(x, seq_lengths=jnp.sum(mask, axis=1))
    memory = self.memory_proj(outputs)

    def both(f):  # one quantity of both directions' final carries
      return jnp.concatenate([f(fwd), f(bwd)], axis=-1)

    h0 = jnp.tanh(self.bridge_h(both(lambda c: _hidden(cfg, c))))
    cell_state = (jnp.tanh(self.bridge_c(both(lambda c: c[0]))), h0) if cfg.cell == 'lstm' else h0
    feed = jnp.zeros(h0.shape, h0.dtype)
    return dict(memory=memory, mask=mask, carry=(cell_state, feed))

  def __call__(self, inputs: jax.Array, targets: jax.Array, *, train: bool = False,
               capture_attention: bool | None = None) -> jax.Array:
    cfg = self.config
    if targets.ndim != 2 or targets.shape[0] != inputs.shape[0]:
      raise ValueError(f'targets must be [batch, length] matching inputs {inputs.shape}, got '
                       f'{targets.shape}')
    enc = self.encode(inputs, train=train)
    y = self.dropout(self.target_embed(shift_right(targets, bos_id=BOS_ID)),
                     deterministic=not train)

    def body(step, carry, y_t, memory, mask):
      return step(carry, y_t, memory, mask, deterministic=not train)

    scan = nn.scan(body, variable_broadcast='params', split_rngs={'params': False,
                                                                  'dropout': True},
                   in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)
    _, (outputs, weights) = scan(self.step, enc['carry'], y, enc['memory'], enc['mask'])
    capture = cfg.capture_attention if capture_attention is None else capture_attention
    if capture and cfg.attention != 'none':
      self.sow(names.INTERMEDIATES, names.RNN_ATTENTION, weights)  # [batch, Lt, Ls]
    outputs = self.dropout(outputs, deterministic=not train)
    return self.logits(outputs).astype(jnp.float32)

  def decode_step(self, state: dict, tokens: jax.Array) -> tuple[jax.Array, dict]:
    """Feeds `tokens` `[batch]`; returns float32 logits `[batch, vocab]` and the new state."""
    carry, (output, _) = self.step(state['carry'], self.target_embed(tokens), state['memory'],
                                   state['mask'])
    return self.logits(output).astype(jnp.float32), dict(state, carry=carry)

  @nn.nowrap
  def decoding_fns(self, params, *, inputs, prompt=None, max_decode_len):
    """See `decoding.DecodeFns`; the state is the encoder memory and the recurrent state."""
    del max_decode_len  # the recurrent state has no length limit
    if inputs is None or inputs.ndim != 2:
      raise ValueError('RNNSeq2Seq decoding needs inputs [batch, length]')
    variables = {'params': params}

    def step(state, tokens):
      return self.apply(variables, state, tokens, method='decode_step')

    def start():
      state = self.apply(variables, inputs, method='encode')
      return step(state, jnp.full((inputs.shape[0],), BOS_ID, jnp.int32))

    return DecodeFns(start, step)
