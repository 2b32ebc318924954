"""Parameter-owning building blocks of the attention modules: projections whose kernels carry
logical axis names (so a mesh can shard them) at their full rank."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

default_kernel_init = nn.initializers.lecun_normal()


def partitioned(init, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


class Projection(nn.Module):
  """`nn.DenseGeneral` whose kernel is created at its full rank.

  `DenseGeneral` initializes a flattened 2-D kernel and reshapes it; under a mesh
  flax applies the kernel's 3-axis logical sharding to that 2-D value and fails.
  Here the same flattened initializer (same fan-in/out, hence the same values
  for the same rng) runs inside a full-rank initializer, so the parameter tree,
  shapes and values equal `DenseGeneral`'s and sharding works.

  Attributes:
    features: output feature shape, e.g. `(heads, head_dim)`.
    contract: how many trailing input axes to contract (1 for q/k/v, 2 for out).
    kernel_axes / bias_axes: logical axis names of the kernel
      `[*in_shape, *features]` and the bias `[*features]`.
  """
  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  contract: int = 1
  kernel_init: Any = default_kernel_init
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.contract:]
    fan_in = int(np.prod(in_shape))

    def full_rank_init(rng, shape, dtype):
      flat = self.kernel_init(rng, (fan_in, int(np.prod(self.features))), dtype)
      return flat.reshape(shape)

    kernel = self.param('kernel', partitioned(full_rank_init, self.kernel_axes),
                        in_shape + tuple(self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, self.bias_axes),
                        tuple(self.features), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    axes = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
    y = jax.lax.dot_general(x, kernel, (axes, ((), ())))
    return y if bias is None else y + bias
