"""Independent float64 NumPy reference for attention, written from the formula.

softmax(q k^T * scale + bias) v per (batch, head), with GQA by index arithmetic,
masked entries excluded, and rows with no allowed entry returning zeros.
"""

from __future__ import annotations

import numpy as np


def reference_attention(q, k, v, *, bias=None, mask=None, scale=None, return_weights=False):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  groups = n // kh
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  out = np.zeros((b, t, n, v.shape[-1]))
  weights = np.zeros((b, n, t, s))
  full_mask = np.ones((b, n, t, s), bool) if mask is None else np.broadcast_to(mask, (b, n, t, s))
  full_bias = np.zeros((b, n, t, s)) if bias is None else np.broadcast_to(
      np.asarray(bias, np.float64), (b, n, t, s))
  for bi in range(b):
    for h in range(n):
      kv_head = h // groups
      logits = q[bi, :, h] @ k[bi, :, kv_head].T * scale + full_bias[bi, h]
      allowed = full_mask[bi, h]
      for i in range(t):
        if not allowed[i].any():
          continue
        row = np.where(allowed[i], logits[i], -np.inf)
        p = np.exp(row - row.max())
        p /= p.sum()
        weights[bi, h, i] = p
        out[bi, i, h] = p @ v[bi, :, kv_head]
  return (out, weights) if return_weights else out


def causal(t, s, offset=0):
  return (np.arange(s)[None, :] <= np.arange(t)[:, None] + offset)[None, None]


def window(t, s, left, right, offset=0):
  q = np.arange(t)[:, None] + offset
  kv = np.arange(s)[None, :]
  return ((kv >= q - left) & (kv <= q + right))[None, None]


def segments(q_ids, kv_ids):
  return (np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :])[:, None]
