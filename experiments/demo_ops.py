r"""A tour of attn_jax.ops in one minute on a CPU: checks and an attention-map figure.

Runs each attention variant the ops offer on one small random batch, checks the
dense path against `jax.nn.dot_product_attention` and the blockwise path against
the dense one (values and gradients), and saves a heatmap of the attention
weights each mask produces.

  python experiments/demo_ops.py --out demo_out
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from attn_jax import ops


def _max_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def run_checks(length: int = 48, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
  """Returns `(rows, panels)`: `(name, max |diff|, tolerance)` checks and weight maps."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, length, heads, head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, length, kv_heads, head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, length, kv_heads, head_dim)), jnp.float32)
  segment_ids = jnp.asarray([[1] * (length // 3) + [2] * (length // 2)
                             + [3] * (length - length // 3 - length // 2)])
  variants = {
      'full': {},
      'causal': dict(is_causal=True),
      'sliding window (8, 0) + causal': dict(is_causal=True, local_window=(8, 0)),
      'packed segments': dict(segment_ids=segment_ids),
      'ALiBi causal': dict(is_causal=True, bias_fn=ops.alibi_bias,
                           bias_params=ops.alibi_slopes(heads)),
      'T5 relative bias': dict(bias_fn=functools.partial(ops.relative_position_bias,
                                                         max_distance=32),
                               bias_params=jnp.asarray(rng.normal(size=(16, heads)),
                                                       jnp.float32)),
  }
  rows, panels = [], {}
  for name, kwargs in variants.items():
    dense, weights = ops.dot_product_attention(q, k, v, implementation='dense',
                                               return_weights=True, **kwargs)
    block = ops.dot_product_attention(q, k, v, implementation='blockwise', block_size=16,
                                      **kwargs)
    rows.append((f'{name}: blockwise vs dense output', _max_diff(block, dense), 1e-5))

    def loss(impl, q, k, v, kwargs=kwargs):
      return jnp.sum(jnp.sin(ops.dot_product_attention(
          q, k, v, implementation=impl, block_size=16, **kwargs)))
    grads_dense = jax.grad(functools.partial(loss, 'dense'), argnums=(0, 1, 2))(q, k, v)
    grads_block = jax.grad(functools.partial(loss, 'blockwise'), argnums=(0, 1, 2))(q, k, v)
    rows.append((f'{name}: blockwise vs dense grads',
                 max(_max_diff(a, b) for a, b in zip(grads_block, grads_dense, strict=True)),
                 1e-4))
    panels[name] = np.asarray(weights[0, 0])
  for name, kwargs in (('full', {}), ('causal', dict(is_causal=True))):
    want = jax.nn.dot_product_attention(q, k, v, **kwargs)
    got = ops.dot_product_attention(q, k, v, implementation='dense', **kwargs)
    rows.append((f'{name}: dense vs jax.nn.dot_product_attention', _max_diff(got, want), 1e-5))
  return rows, panels


def plot_panels(panels: dict[str, np.ndarray], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(12, 8))
  for ax, (name, weights) in zip(axes.ravel(), panels.items(), strict=True):
    image = ax.imshow(weights, cmap='viridis', vmin=0.0)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel('key position')
    ax.set_ylabel('query position')
    fig.colorbar(image, ax=ax, fraction=0.046, label='attention weight')
  fig.suptitle('attn_jax.ops.dot_product_attention weights (head 0, random q/k)')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='demo_out', help='directory for the PNG')
  args = parser.parse_args()
  rows, panels = run_checks()
  failed = 0
  for name, diff, tol in rows:
    ok = diff <= tol
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name:<60} max|diff| = {diff:.2e} (tol {tol:.0e})")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'attention_masks.png')
  plot_panels(panels, path)
  print(f'saved {path}')
  if failed:
    raise SystemExit(f'{failed} check(s) failed')
  print(f'all {len(rows)} checks passed')


if __name__ == '__main__':
  main()
