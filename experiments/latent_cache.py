r"""Decode-cache bytes per token and layer of multi-head latent attention against MHA, GQA and
MQA at the same width, read from the caches the layers create (shapes only, nothing runs):

  PYTHONPATH=$PWD python experiments/latent_cache.py

Keys and values only: every layout also keeps 8 bytes per token of int32 segment and position.
MLA at DeepSeek-V2's ratios (latent rank 4 x head_dim, RoPE part head_dim / 2) caches
4.5 x head_dim numbers per token, as GQA with 2.25 key/value heads would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from attn_jax.models import AttentionConfig, MultiHeadAttention

WIDTHS = ((512, 8), (1024, 16), (48, 4))  # (d_model, heads); the last is the ablation's
TOKENS = 64


def layouts(heads: int, head_dim: int) -> dict[str, AttentionConfig]:
  return {
      'MHA': AttentionConfig(num_heads=heads),
      'GQA, kv heads / 4': AttentionConfig(num_heads=heads, num_kv_heads=heads // 4),
      'MQA': AttentionConfig(num_heads=heads, num_kv_heads=1),
      'MLA, rank 4 d_h, RoPE d_h / 2': AttentionConfig(
          num_heads=heads, kind='latent', kv_lora_rank=4 * head_dim,
          qk_rope_head_dim=head_dim // 2),
      'MLA, rank d_model / 2, RoPE d_h / 2 (ablation)': AttentionConfig(
          num_heads=heads, kind='latent', kv_lora_rank=heads * head_dim // 2,
          qk_rope_head_dim=head_dim // 2),
  }


def kv_bytes_per_token(config: AttentionConfig, d_model: int, dtype) -> int:
  """Bytes of `cached_key` + `cached_value` per token, from the layer's own cache."""
  attn = MultiHeadAttention(config, is_causal=True, positional='rope', dtype=dtype)
  x = jnp.zeros((1, TOKENS, d_model), dtype)
  cache = jax.eval_shape(lambda: attn.init(jax.random.key(0), x, decode=True))['cache']
  total = sum(int(np.prod(cache[k].shape)) * cache[k].dtype.itemsize
              for k in ('cached_key', 'cached_value') if k in cache)
  return total // TOKENS


def main(argv):
  del argv
  print('| d_model, heads (head_dim) | layout | bf16 bytes/token/layer | fp32 | vs MHA |')
  print('|---|---|---|---|---|')
  for d_model, heads in WIDTHS:
    head_dim = d_model // heads
    mha = None
    for name, config in layouts(heads, head_dim).items():
      bf16 = kv_bytes_per_token(config, d_model, jnp.bfloat16)
      fp32 = kv_bytes_per_token(config, d_model, jnp.float32)
      mha = mha or bf16
      print(f'| {d_model}, {heads} ({head_dim}) | {name} | {bf16:,} | {fp32:,} | '
            f'{bf16 / mha:.3f} |')


if __name__ == '__main__':
  app.run(main)
