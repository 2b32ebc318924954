"""Train state: a pytree of params, optimizer state, step and RNG key.

The state is a `flax.struct` dataclass so it passes through `jit`/`pmap`, checkpointing and
sharding as one tree. Params are kept unboxed (plain arrays); logical partitioning metadata
(`nn.with_logical_partitioning`) is read once from `jax.eval_shape` of the initializer, before
anything is allocated, to derive shardings (see `parallel.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and writes.

  Attributes:
    step: int32 scalar, number of train steps taken (micro-steps under grad accumulation).
    params: float32 parameter tree (unboxed).
    opt_state: optax state for `params`.
    rng: uint32 `[2]` PRNG key; per-step keys are `fold_in(rng, step)`, so the key itself
      never changes and resuming at step n reproduces step n's dropout exactly.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


InitFn = Callable[[jax.Array], Any]


def abstract_params(init_params: InitFn, rng: jax.Array) -> Any:
  """Shapes/dtypes of `init_params(rng)` (possibly boxed with logical axes), no allocation."""
  return jax.eval_shape(init_params, rng)


def param_count(params: Any) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))


def _check_float32(params: Any) -> None:
  bad = [
      (jax.tree_util.keystr(path), leaf.dtype)
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
      if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != jnp.float32
  ]
  if bad:
    raise ValueError(
        'params must be float32 (use param_dtype=float32; bf16 is for compute only); '
        f'got {bad[:5]}{" ..." if len(bad) > 5 else ""}')


def init_state(init_params: InitFn, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Builds a TrainState (pure; call under `jit` with `out_shardings` to place it).

  Args:
    init_params: `rng -> params` (e.g. `lambda r: model.init(r, dummy)['params']`); may
      return logically boxed params, which are unboxed here.
    tx: optimizer from `optim.make_optimizer`.
    rng: PRNG key (raw `PRNGKey` or typed `jax.random.key`); split into an init key and the
      state's dropout key, which is kept as raw uint32 data.

  Raises:
    ValueError: if a floating param is not float32.
  """
  init_rng, state_rng = jax.random.split(rng)
  if jnp.issubdtype(state_rng.dtype, jax.dtypes.prng_key):
    # Stored as raw uint32 key data: checkpoints and shardings treat it as a plain array.
    state_rng = jax.random.key_data(state_rng)
  params = nn.meta.unbox(init_params(init_rng))
  _check_float32(params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=state_rng,
  )


def abstract_state(init_params: InitFn, tx: optax.GradientTransformation,
                   rng: jax.Array) -> TrainState:
  """`jax.eval_shape` of `init_state`: the state's ShapeDtypeStructs, nothing allocated."""
  return jax.eval_shape(lambda r: init_state(init_params, tx, r), rng)


def create_train_state(init_params: InitFn, tx: optax.GradientTransformation, rng: jax.Array,
                       *, shardings: Any | None = None) -> TrainState:
  """Allocates the state once, directly with `shardings` (a TrainState of Shardings) if given.

  Shapes are checked first with `jax.eval_shape` so dtype errors surface before allocation.
  """
  abstract_state(init_params, tx, rng)  # Raises on bad dtypes without allocating.
  fn = jax.jit(lambda r: init_state(init_params, tx, r), out_shardings=shardings)
  return fn(rng)
