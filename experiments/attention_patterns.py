r"""Pictures of the README's three "Write your own attention" examples, drawn from their block
masks: which (query, key) pairs are visible, and which blocks the attention loop visits fully,
partly (mask evaluated) or never.

  python experiments/attention_patterns.py --out experiments/figures

Writes pattern_softcap.png (causal, with the soft-capped logits), pattern_documents.png
(packed documents) and pattern_global_window.png (global tokens plus a sliding window).
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attn_jax import ops
from attn_jax.experiment import plots
from attn_jax.ops import mask_mods

_OUT = flags.DEFINE_string('out', 'experiments/figures', 'Directory for the PNGs.')
LENGTH, BLOCK = 512, 64


def examples() -> dict[str, tuple[object, str]]:
  """name -> (block mask, title): the README's examples at LENGTH tokens, BLOCK-sized blocks."""
  doc_ids = jnp.asarray(np.repeat(np.arange(4), [96, 160, 64, 192])[None])  # [1, 512]

  def same_document(b, h, q_idx, kv_idx):
    return doc_ids[b, q_idx] == doc_ids[b, kv_idx]

  def build(mask_mod):
    return ops.block_mask(mask_mod, batch=1, heads=1, q_len=LENGTH, block_size=BLOCK)

  return {
      'softcap': (build(mask_mods.causal()), 'causal attention, soft-capped logits'),
      'documents': (build(ops.and_masks(mask_mods.causal(), same_document)),
                    'four packed documents, causal within each'),
      'global_window': (build(mask_mods.global_and_window(16, 32)),
                        '16 global tokens + a 32-token window each side'),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = pathlib.Path(_OUT.value)
  for name, (block_mask, title) in examples().items():
    path = plots.plot_block_mask(block_mask, out / f'pattern_{name}.png', title=title)
    print(path)


if __name__ == '__main__':
  app.run(main)
