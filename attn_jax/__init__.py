"""attn_jax: attention mechanisms in JAX/Flax.

Layers (imports only point up): `ops` (pure functions) <- `models` (flax.linen)
<- `data` / `train` <- `experiments/` entry points.
"""

__version__ = '0.1.0'
