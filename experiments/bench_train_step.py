r"""The translation train step: attn_jax's, as `train.py` builds it, against the same model
assembled from flax.linen's own modules (Embed, MultiHeadDotProductAttention, Dense,
LayerNorm, as flax's `examples/wmt` builds its Transformer), same shapes, same optimizer.

  python experiments/bench_train_step.py --output_dir=experiments/figures

The model is `configs/translation.py:model=small,data=local` (3+3 layers, d_model 256, 4 heads,
d_ff 1024, shared 8K vocabulary, dropout 0.1, label smoothing 0.1, AdamW with the config's
schedule); batches are 32 rows of 64 source and 64 target tokens with realistic padding
(lengths drawn from 16-64). A third row runs attn_jax with `pad_skip_chunk=0`, computing the
padding as flax does. The steps are jitted with the state donated, compiled ahead, and timed
alternately (median over `--repeats`), so machine load hits them alike. Reported:
real (non-pad) tokens/s, the ratio attn_jax / flax, and the model FLOP/s utilisation: the
matmul FLOPs the real tokens need (padding not counted) per second, against the machine's
float32 2048^3 matmul rate (best of 10) measured in the same run.
"""

from __future__ import annotations

from attn_jax.experiment import allocator

allocator.reexec_with_tcmalloc()  # ATTN_JAX_ALLOCATOR=tcmalloc, as train.py

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from attn_jax import ops  # noqa: E402
from attn_jax.experiment import provenance, tasks  # noqa: E402
from attn_jax.train import losses, optim, throughput  # noqa: E402
from attn_jax.train import state as state_lib  # noqa: E402
from attn_jax.train import step as step_lib  # noqa: E402
from attn_jax.train.loop import optim_config  # noqa: E402
from configs import translation  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('output_dir', '/tmp/bench_train_step', 'Where to write the JSON.')
flags.DEFINE_integer('repeats', 20, 'Timed steps per implementation (median reported).')
flags.DEFINE_integer('batch', 32, 'Rows per batch.')
flags.DEFINE_integer('length', 64, 'Padded source and target length.')
flags.DEFINE_integer('vocab', 8000, 'Shared vocabulary.')
flags.DEFINE_bool('padding_row', True, 'Also time attn_jax computing padding (pad_skip_chunk=0).')
flags.DEFINE_string('config_arg', 'model=small,data=local',
                    "configs/translation.py's argument (',smoke' for a tiny model).")


# --- The same model from flax.linen's modules -------------------------------------------------


class _Mlp(nn.Module):
  d_ff: int
  dropout: float

  @nn.compact
  def __call__(self, x, train):
    y = nn.relu(nn.Dense(self.d_ff)(x))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return nn.Dense(x.shape[-1])(y)


class _EncoderLayer(nn.Module):
  heads: int
  d_ff: int
  dropout: float

  @nn.compact
  def __call__(self, x, mask, train):
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)  # noqa: E731
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(x, x, mask=mask)
    x = nn.LayerNorm(epsilon=1e-6)(x + drop(y))  # post-norm, as the config's model
    return nn.LayerNorm(epsilon=1e-6)(x + drop(_Mlp(self.d_ff, self.dropout)(x, train)))


class _DecoderLayer(nn.Module):
  heads: int
  d_ff: int
  dropout: float

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask, train):
    drop = lambda z: nn.Dropout(self.dropout)(z, deterministic=not train)  # noqa: E731
    z = nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y, mask=self_mask)
    y = nn.LayerNorm(epsilon=1e-6)(y + drop(z))
    z = nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, encoded, mask=cross_mask)
    y = nn.LayerNorm(epsilon=1e-6)(y + drop(z))
    return nn.LayerNorm(epsilon=1e-6)(y + drop(_Mlp(self.d_ff, self.dropout)(y, train)))


class FlaxTransformer(nn.Module):
  """Shared embeddings scaled by sqrt(d), added sinusoids, post-norm layers, tied logits."""
  vocab: int
  d_model: int
  heads: int
  d_ff: int
  layers: int
  dropout: float

  @nn.compact
  def __call__(self, inputs, targets, train=False):
    embed = nn.Embed(self.vocab, self.d_model,
                     embedding_init=nn.initializers.normal(self.d_model ** -0.5))
    drop = lambda z: nn.Dropout(self.dropout)(z, deterministic=not train)  # noqa: E731

    def embed_tokens(tokens):
      x = embed(tokens) * jnp.sqrt(self.d_model)
      return drop(x + ops.sinusoidal(jnp.arange(tokens.shape[1]), self.d_model))

    x = embed_tokens(inputs)
    src_valid = inputs > 0
    enc_mask = nn.make_attention_mask(src_valid, src_valid)
    for _ in range(self.layers):
      x = _EncoderLayer(self.heads, self.d_ff, self.dropout)(x, enc_mask, train)
    decoder_inputs = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=1)[:, :-1]
    y = embed_tokens(decoder_inputs)
    tgt_valid = targets > 0
    self_mask = nn.combine_masks(nn.make_attention_mask(tgt_valid, tgt_valid),
                                 nn.make_causal_mask(targets))
    cross_mask = nn.make_attention_mask(tgt_valid, src_valid)
    for _ in range(self.layers):
      y = _DecoderLayer(self.heads, self.d_ff, self.dropout)(y, x, self_mask, cross_mask, train)
    return embed.attend(y).astype(jnp.float32)


# --- Steps ----------------------------------------------------------------------------------


def _batch(rng, batch, length, vocab):
  lengths = rng.integers(max(1, length // 4), length + 1, size=(2, batch))  # 16-64 at 64
  tokens = rng.integers(4, vocab, size=(2, batch, length))
  valid = np.arange(length)[None, None, :] < lengths[:, :, None]
  tokens = np.where(valid, tokens, 0)
  tokens[np.arange(2)[:, None], np.arange(batch)[None, :], lengths - 1] = 2  # EOS
  return {'inputs': jnp.asarray(tokens[0], jnp.int32),
          'targets': jnp.asarray(tokens[1], jnp.int32)}


def attn_jax_step(config, meta):
  """The train step exactly as `train_and_evaluate` builds it for this config."""
  task = tasks.make_task(config, meta)
  tx, schedule = optim.make_optimizer(optim_config(config))
  state = state_lib.create_train_state(task.init_params, tx, jax.random.PRNGKey(0))
  step = jax.jit(step_lib.make_train_step(task.loss_fn, tx, schedule), donate_argnums=(0,))
  return state, step, state_lib.param_count(state.params)


def flax_step(config, meta):
  cfg = tasks.build_model_config(config.model.to_dict(), meta)
  model = FlaxTransformer(vocab=cfg.vocab_size, d_model=cfg.d_model, heads=cfg.num_heads,
                          d_ff=cfg.d_ff, layers=cfg.num_encoder_layers,
                          dropout=cfg.dropout_rate)
  tx, _ = optim.make_optimizer(optim_config(config))
  dummy = jnp.ones((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), dummy, dummy)['params']
  smoothing = float(config.loss.label_smoothing)

  def loss_fn(params, batch, rng):
    logits = model.apply({'params': params}, batch['inputs'], batch['targets'], train=True,
                         rngs={'dropout': rng})
    weights = losses.token_weights(batch['targets'])
    objective, _ = losses.softmax_loss_and_metrics(logits, batch['targets'], weights,
                                                   label_smoothing=smoothing)
    return objective / jnp.sum(weights)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, batch):
    params, opt_state, rng = state
    rng, sub = jax.random.split(rng)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, rng), loss

  state = (params, tx.init(params), jax.random.key(1))
  return state, step, sum(x.size for x in jax.tree.leaves(params))


def model_flops_per_step(cfg, batch) -> float:
  """Training FLOPs (3x forward) of the matmuls the real tokens need: projections, FFN and
  logits per real token, attention scores and values per pair of real tokens. Padding is not
  counted, so an implementation that computes it is charged for it."""
  d, f, layers = cfg.d_model, cfg.d_ff, cfg.num_encoder_layers
  src = np.asarray(batch['inputs'] > 0).sum(axis=1).astype(np.float64)
  tgt = np.asarray(batch['targets'] > 0).sum(axis=1).astype(np.float64)
  attn_proj = 4 * d * d  # q, k, v, out
  enc = layers * (2 * src.sum() * (attn_proj + 2 * d * f) + 2 * 2 * (src * src).sum() * d)
  dec = layers * (2 * tgt.sum() * (2 * attn_proj + 2 * d * f)
                  + 2 * 2 * ((tgt * tgt).sum() + (tgt * src).sum()) * d)
  logits = 2 * tgt.sum() * d * cfg.vocab_size
  return 3.0 * (enc + dec + logits)


def main(argv):
  del argv
  config = translation.get_config(FLAGS.config_arg)
  config.unlock()
  meta = {'task': 'seq2seq', 'input_vocab_size': FLAGS.vocab, 'target_vocab_size': FLAGS.vocab,
          'max_length': FLAGS.length, 'max_target_length': FLAGS.length}
  batches = [_batch(np.random.default_rng(i), FLAGS.batch, FLAGS.length, FLAGS.vocab)
             for i in range(4)]
  real_tokens = [int((b['inputs'] > 0).sum() + (b['targets'] > 0).sum()) for b in batches]
  # The third row computes padding like flax does: what skipping it is worth on its own.
  dense_config = config.copy_and_resolve_references()
  dense_config.model.pad_skip_chunk = 0
  runs = {}
  rows = [('attn_jax', attn_jax_step, config),
          ('attn_jax_no_pad_skip', attn_jax_step, dense_config),
          ('flax_linen', flax_step, config)]
  for name, build, cfg in rows if FLAGS.padding_row else rows[::2]:
    state, step, params = build(cfg, meta)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    state, _ = compiled(state, batches[0])
    jax.block_until_ready(state)
    runs[name] = dict(state=state, step=compiled, params=params, compile_s=compile_s, times=[])
  for i in range(FLAGS.repeats):
    for run in runs.values():
      batch = batches[i % len(batches)]
      start = time.perf_counter()
      run['state'], _ = run['step'](run['state'], batch)
      jax.block_until_ready(run['state'])
      run['times'].append(time.perf_counter() - start)
  cfg = tasks.build_model_config(config.model.to_dict(), meta)
  flops = statistics.mean(model_flops_per_step(cfg, b) for b in batches)
  ceiling = throughput.matmul_flops_per_second(size=2048, reps=10) / 1e9
  tokens_per_step = statistics.mean(real_tokens)
  results = {}
  for name, run in runs.items():
    median = statistics.median(run['times'])
    results[name] = dict(params=int(run['params']), compile_s=run['compile_s'],
                         median_step_s=median, tokens_per_s=tokens_per_step / median,
                         model_gflops=flops / median / 1e9,
                         utilisation=flops / median / 1e9 / ceiling)
  ratio = results['attn_jax']['tokens_per_s'] / results['flax_linen']['tokens_per_s']
  allocator = os.environ.get('LD_PRELOAD', '') or 'system malloc'
  print(f'train step, batch {FLAGS.batch} x ({FLAGS.length} + {FLAGS.length}) tokens, '
        f'{tokens_per_step:.0f} real tokens/step; matmul ceiling {ceiling:.0f} GFLOP/s; '
        f'{provenance.cpu_model()}; allocator: {allocator}')
  print(f"{'':>20} {'params':>10} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} {'util':>6}")
  for name, r in results.items():
    print(f"{name:>20} {r['params']:>10} {1e3 * r['median_step_s']:>9.1f} "
          f"{r['tokens_per_s']:>10.0f} {r['model_gflops']:>8.1f} {r['utilisation']:>6.1%}")
  print(f'attn_jax / flax_linen tokens/s: {ratio:.2f}x')
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  name = 'train_step_tcmalloc.json' if 'tcmalloc' in allocator else 'train_step_malloc.json'
  with open(os.path.join(FLAGS.output_dir, name), 'w') as f:
    json.dump(dict(provenance=provenance.collect(), allocator=allocator,
                   batch=FLAGS.batch, length=FLAGS.length, vocab=FLAGS.vocab,
                   matmul_gflops=ceiling, model_flops_per_step=flops,
                   real_tokens_per_step=tokens_per_step, results=results, ratio=ratio), f,
              indent=1)


if __name__ == '__main__':
  app.run(main)
