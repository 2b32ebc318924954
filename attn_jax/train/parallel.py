"""Data/model parallelism as wrappers around one pure train step.

Two ways to run `step(state, batch) -> (state, metrics)` (from `step.make_train_step`):

- `pmap_train_step`: replicated state, batch reshaped to `[devices, per_device, ...]`,
  gradients, counts and metrics `psum`med over the device axis inside the step.
- `sharded_train_step`: `jax.jit` over a `Mesh` with axes `('data', 'fsdp', 'sequence',
  'tensor')`; the batch is split over `data` x `fsdp` (and its length over `sequence`: context
  parallelism, which the models turn into ring attention), params are sharded by their flax
  logical axis names (`nn.with_logical_partitioning`) mapped to mesh axes by rules from the
  config. XLA inserts the collectives; the step itself is the single-device function.

Multi-host: `initialize_distributed` starts JAX's runtime from the config or environment;
`global_batch` turns each process's local rows into one global array; only process 0 writes.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax.train.config import BATCH_AXES, DEFAULT_RULES

MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')
SEQUENCE_AXIS = 'sequence'  # context parallelism: the length of every sequence split over it
PARALLEL_MODES = ('none', 'pmap', 'sharded')


# --------------------------------------------------------------------------- multi-host


def initialize_distributed(config: ml_collections.ConfigDict | None = None) -> bool:
  """Starts `jax.distributed` from `config.parallel` fields or the environment.

  The coordinator comes from `config.coordinator_address` or `JAX_COORDINATOR_ADDRESS`
  (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); if neither is set this is a no-op (one
  process). On CPU the gloo collectives are selected first, which cross-process CPU
  all-reduces need. Must run before any other JAX call touches the backend.

  Returns:
    True if the distributed runtime was initialized.
  """
  get = (lambda k, d: config.get(k, d)) if config is not None else (lambda k, d: d)
  address = get('coordinator_address', '') or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if not address:
    return False
  num = int(os.environ.get('JAX_NUM_PROCESSES', get('num_processes', 1)))
  pid = int(os.environ.get('JAX_PROCESS_ID', get('process_id', 0)))
  if num < 1 or not 0 <= pid < num:
    raise ValueError(f'process_id={pid} must be in [0, num_processes={num})')
  platforms = os.environ.get('JAX_PLATFORMS', '') or str(jax.config.jax_platforms or '')
  if not platforms or 'cpu' in platforms:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(address, num_processes=num, process_id=pid)
  logging.info('jax.distributed: process %d/%d, %d local / %d global devices', pid, num,
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on the process that writes logs, metrics and (with orbax) checkpoint metadata."""
  return jax.process_index() == 0


def local_batch_size(global_batch_size: int) -> int:
  """Rows each process loads for `global_batch_size`; raises if it does not divide."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f'batch_size={global_batch_size} not divisible by process_count={n}')
  return global_batch_size // n


def to_host(tree: Any) -> Any:
  """numpy copy of a tree of (possibly multi-process) arrays.

  Replicated global arrays (metrics) are read from a local shard, so no cross-process
  transfer happens; other non-addressable arrays are all-gathered.
  """
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------- pmap


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None,
              axis_name: str = 'batch') -> Any:
  """Copies every leaf to all local devices: leaves get a leading `[num_devices]` axis.

  The arrays carry exactly the sharding `jax.pmap(axis_name=axis_name)` gives its outputs,
  so the second step sees the same input types as the first and does not retrace.
  """
  devices = list(devices or jax.local_devices())
  # `jax.device_put_replicated` is gone in jax 0.10: assemble the [n, ...] array from one
  # copy per device, sharded along the new leading axis like pmap expects.
  sharding = NamedSharding(Mesh(np.asarray(devices), (axis_name,)), PartitionSpec(axis_name))

  def one(x):
    x = jnp.asarray(x)
    shards = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)

  return jax.tree_util.tree_map(one, tree)


def unreplicate(tree: Any) -> Any:
  """First device's copy of a replicated tree (identical on all devices after psum)."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_batch(batch: Mapping[str, Any], num_devices: int | None = None) -> dict[str, Any]:
  """Reshapes host arrays `[b, ...]` to `[num_devices, b // num_devices, ...]` for pmap.

  Raises:
    ValueError: naming the field whose batch size does not divide by the device count.
  """
  n = num_devices or jax.local_device_count()
  out = {}
  for name, x in batch.items():
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(f'batch[{name!r}] shape {x.shape}: batch size not divisible by {n} devices')
    out[name] = x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return out


def pmap_train_step(step_fn: Callable[..., Any], axis_name: str = 'batch') -> Callable[..., Any]:
  """`pmap` of `step_fn(state, batch, progress, axis_name=...)`; the replicated state is
  donated.

  Returns `fn(replicated_state, sharded_batch, progress=None) -> (replicated_state,
  replicated_metrics)`, `progress` (a host scalar or None) going to every device; take
  `unreplicate(metrics)` for logging.
  """
  mapped = jax.pmap(functools.partial(step_fn, axis_name=axis_name), axis_name=axis_name,
                    in_axes=(0, 0, None), donate_argnums=(0,))

  def run(state, batch, progress=None):
    return mapped(state, batch, progress)

  run.lower = mapped.lower  # For throughput.step_flops.
  return run


def pmap_eval_step(eval_fn: Callable[..., Any], axis_name: str = 'batch') -> Callable[..., Any]:
  """`pmap` of `eval_fn(state, batch, axis_name=...)` -> replicated metrics."""
  return jax.pmap(functools.partial(eval_fn, axis_name=axis_name), axis_name=axis_name)


# --------------------------------------------------------------------------- mesh


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes `('data', 'fsdp', 'sequence', 'tensor')`; one size may be -1 (fills the
  rest).

  Missing axes have size 1, except `data`, which defaults to -1.

  Raises:
    ValueError: for unknown axis names, more than one -1, or sizes whose product is not the
      device count.
  """
  devices = list(devices or jax.devices())
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'config.parallel.mesh has unknown axes {sorted(unknown)}; known {MESH_AXES}')
  # A missing 'data' axis takes the remaining devices, unless another axis already does.
  data_default = 1 if -1 in [mesh_config.get(a) for a in MESH_AXES] else -1
  sizes = [int(mesh_config.get(a, data_default if a == 'data' else 1)) for a in MESH_AXES]
  named = lambda: dict(zip(MESH_AXES, sizes, strict=True))  # noqa: E731
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.parallel.mesh={named()}: sizes must be >= 1, '
                     'with at most one -1')
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % rest:
      raise ValueError(f'config.parallel.mesh={named()} does not divide '
                       f'{len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // rest
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.parallel.mesh={named()} needs '
                     f'{int(np.prod(sizes))} devices, have {len(devices)}')
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def _rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  rules = DEFAULT_RULES if rules is None else rules
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'logical_axis_rules entry {rule!r} must be (logical_name, mesh_axes)')
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f'logical_axis_rules entry {rule!r}: mesh axis {a!r} not in {MESH_AXES}')
    out.append((name, axes))
  return tuple(out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, where: str,
              dropped: list[str]) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (logged), so any model shape can shard."""
  parts = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if names and dim % size:
      dropped.append(f'{where} dim {dim} !% {names}')
      parts.append(None)
    else:
      parts.append(axes)
  return PartitionSpec(*parts)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh,
                    rules: Sequence[Sequence[Any]] | None = None) -> Any:
  """NamedShardings for the *unboxed* params, from the logical axis names on the boxes.

  Args:
    abstract_boxed_params: `jax.eval_shape(init_params, rng)`, possibly containing
      `nn.LogicallyPartitioned` boxes; unboxed leaves are replicated.
    mesh: from `make_mesh`.
    rules: `(logical_name, mesh_axis | tuple | None)` pairs; default `DEFAULT_RULES`.
  """
  rules = _rules(rules)
  logical = nn.get_partition_spec(abstract_boxed_params)
  shapes = nn.meta.unbox(abstract_boxed_params)
  dropped: list[str] = []

  def one(path, spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec else PartitionSpec()
    fitted = _fit_spec(mesh_spec, shape.shape, mesh, jax.tree_util.keystr(path), dropped)
    return NamedSharding(mesh, fitted)

  out = jax.tree_util.tree_map_with_path(
      one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
  if dropped:
    logging.warning('%d param dims left unsharded (size not divisible): %s', len(dropped),
                    dropped[:8])
  return out


def state_shardings(abstract_state: Any, abstract_boxed_params: Any, mesh: Mesh,
                    rules: Sequence[Sequence[Any]] | None = None) -> Any:
  """Shardings for a whole TrainState: params by logical axes; optimizer moments like the
  param they belong to (matched by key-path suffix and shape); everything else replicated.
  """
  p_shard = param_shardings(abstract_boxed_params, mesh, rules)
  by_path = {}
  for path, sharding in jax.tree_util.tree_leaves_with_path(p_shard):
    by_path[tuple(path)] = sharding
  shapes = {tuple(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(
      abstract_state.params)}
  replicated = NamedSharding(mesh, PartitionSpec())

  def for_opt(path, leaf):
    path = tuple(path)
    for start in range(len(path)):
      suffix = path[start:]
      if suffix in by_path and shapes.get(suffix) == leaf.shape:
        return by_path[suffix]
    return replicated

  return abstract_state.replace(
      step=replicated,
      params=p_shard,
      opt_state=jax.tree_util.tree_map_with_path(for_opt, abstract_state.opt_state),
      rng=replicated,
  )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """A batch field of `ndim` axes: the leading (batch) axis split over `data` x `fsdp`, the
  second (length) over `sequence` (context parallelism), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([SEQUENCE_AXIS] if ndim > 1 else [])))


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows `[b_local, ...]` into global arrays `[b_local * P, ...]`.

  With one process this is a sharded `device_put`. Rows of process i land at
  `[i * b_local, (i + 1) * b_local)` in the global batch.
  """
  ndev = mesh.shape['data'] * mesh.shape['fsdp']
  pieces = mesh.shape[SEQUENCE_AXIS]
  out = {}
  for name, x in local_batch.items():
    x = np.asarray(x)
    if x.ndim == 0 or (x.shape[0] * jax.process_count()) % ndev:
      raise ValueError(f'batch[{name!r}] shape {x.shape}: global batch not divisible by '
                       f'data*fsdp={ndev}')
    if x.ndim > 1 and x.shape[1] % pieces:
      raise ValueError(f'batch[{name!r}] shape {x.shape}: its length {x.shape[1]} does not '
                       f'split over sequence={pieces} devices (config.parallel.mesh.sequence)')
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return out


def sharded_train_step(step_fn: Callable[..., Any], mesh: Mesh, shardings: Any,
                       rules: Sequence[Sequence[Any]] | None = None) -> Callable[..., Any]:
  """`jax.jit` of `step_fn(state, batch, progress)` with state shardings in and out (donated);
  `progress` (a host scalar or None) is replicated.

  Logical axis rules and the mesh are active while tracing, so `nn.with_logical_constraint`
  inside models resolves. Metrics come back replicated.
  """
  rules = _rules(rules)

  def fn(state, batch, progress):
    with nn.logical_axis_rules(rules):
      return step_fn(state, batch, progress)

  replicated = NamedSharding(mesh, PartitionSpec())
  # The batch keeps the sharding `global_batch` gave each field (None: as placed).
  jitted = jax.jit(fn, in_shardings=(shardings, None, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  def run(state, batch, progress=None):
    with jax.set_mesh(mesh):
      return jitted(state, batch, progress)

  run.jitted = jitted  # For tests: `run.jitted._cache_size()` counts compilations.
  return run


def sharded_eval_step(eval_fn: Callable[..., Any], mesh: Mesh, shardings: Any,
                      rules: Sequence[Sequence[Any]] | None = None) -> Callable[..., Any]:
  """`jax.jit` of `eval_fn(state, batch)` on the mesh; metrics come back replicated."""
  rules = _rules(rules)

  def fn(state, batch):
    with nn.logical_axis_rules(rules):
      return eval_fn(state, batch)

  jitted = jax.jit(fn, in_shardings=(shardings, None),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

  def run(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  return run
