"""A tiny token model, its loss and a deterministic batch iterator, for tests/train only.

The model is a per-position MLP over embeddings with logical partitioning names, so the
sharded path has something to shard; the iterator has grain-like `get_state`/`set_state`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from attn_jax.train import losses

VOCAB = 16
LENGTH = 6
EMBED = 8
HIDDEN = 16


class TinyModel(nn.Module):
  """`[b, len]` int32 tokens -> `[b, len, VOCAB]` float32 logits."""

  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train=False):
    emb = self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('vocab', 'embed')), (VOCAB, EMBED), jnp.float32)
    x = jnp.take(emb, tokens, axis=0).astype(self.dtype)
    x = nn.Dense(HIDDEN, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('embed', 'mlp')), name='hidden')(x)
    x = nn.LayerNorm(dtype=self.dtype, name='norm')(nn.relu(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(VOCAB, dtype=self.dtype, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('mlp', 'vocab')), name='out')(x)
    return x.astype(jnp.float32)


def make_task(dropout_rate: float = 0.0, dtype=jnp.float32, label_smoothing: float = 0.0):
  """Returns `(init_params, loss_fn)` for TinyModel on `make_batch` batches."""
  model = TinyModel(dropout_rate=dropout_rate, dtype=dtype)

  def init_params(rng):
    return model.init(rng, jnp.zeros((1, LENGTH), jnp.int32))['params']

  def loss_fn(params, batch, rng, train):
    logits = model.apply({'params': params}, batch['inputs'], train=train,
                         rngs={'dropout': rng} if train else None)
    weights = losses.token_weights(batch['targets'])
    return losses.softmax_loss_and_metrics(logits, batch['targets'], weights,
                                           label_smoothing=label_smoothing)

  return init_params, loss_fn


def make_batch(seed: int, index: int, batch_size: int = 8) -> dict[str, np.ndarray]:
  """Batch `index` of stream `seed`: targets = inputs + 1 (mod VOCAB), padded with 0."""
  rng = np.random.default_rng([seed, index])
  inputs = rng.integers(4, VOCAB, size=(batch_size, LENGTH)).astype(np.int32)
  lengths = rng.integers(2, LENGTH + 1, size=(batch_size,))
  valid = np.arange(LENGTH)[None] < lengths[:, None]
  targets = np.where(valid, (inputs + 1) % VOCAB, 0).astype(np.int32)
  return {'inputs': np.where(valid, inputs, 0).astype(np.int32), 'targets': targets}


class BatchIterator:
  """Endless deterministic batches with an opaque, JSON-able position state."""

  def __init__(self, seed: int = 0, batch_size: int = 8, offset: int = 0, stride: int = 1):
    self.seed, self.batch_size, self.index = seed, batch_size, 0
    self.offset, self.stride = offset, stride  # Rows of a process: [offset::stride].

  def __iter__(self):
    return self

  def __next__(self):
    batch = make_batch(self.seed, self.index, self.batch_size * self.stride)
    self.index += 1
    return {k: v[self.offset * self.batch_size:(self.offset + 1) * self.batch_size]
            for k, v in batch.items()}

  def get_state(self):
    return {'index': self.index, 'seed': self.seed}

  def set_state(self, state):
    if state['seed'] != self.seed:
      raise ValueError(f'iterator state seed {state["seed"]} != {self.seed}')
    self.index = int(state['index'])
