"""One process of the two-process test: `python -m tests.train.mp_worker OUT_DIR STEPS`.

Reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; each process feeds its
half of every global batch; process 0 writes the losses to OUT_DIR/losses.json.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax

from attn_jax.train import checkpoint as ckpt_lib
from attn_jax.train import parallel
from attn_jax.train import state as state_lib


def main(out_dir: str, steps: int) -> None:
  parallel.initialize_distributed()
  from tests.train import test_parallel, tiny

  init_params, tx, step_fn = test_parallel.make_setup()
  mesh = parallel.make_mesh({'data': -1})
  rng = jax.random.PRNGKey(0)
  shardings = parallel.state_shardings(state_lib.abstract_state(init_params, tx, rng),
                                       state_lib.abstract_params(init_params, rng), mesh)
  state = state_lib.create_train_state(init_params, tx, rng, shardings=shardings)
  step = parallel.sharded_train_step(step_fn, mesh, shardings)
  local = tiny.BatchIterator(seed=0, batch_size=parallel.local_batch_size(8),
                             offset=jax.process_index(), stride=jax.process_count())
  losses = []
  for _ in range(steps):
    state, m = step(state, parallel.global_batch(next(local), mesh))
    m = parallel.to_host(m)
    losses.append(float(m['loss'][0] / m['loss'][1]))
  # Each process checkpoints its own iterator position and gets it back; the sharded state
  # round-trips through orbax's multi-process save.
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(out_dir) / 'ckpt', async_save=False)
  ckpt.save(steps, state, data_state=local.get_state() | {'pid': jax.process_index()})
  abstract = ckpt_lib.with_shardings(jax.eval_shape(lambda: state), shardings)
  restored = ckpt.restore(abstract)
  ckpt.close()
  assert restored.step == steps
  assert restored.data_state == {'index': steps, 'seed': 0, 'pid': jax.process_index()}
  same = jax.jit(lambda a, b: jax.numpy.all(jax.numpy.stack(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(jax.numpy.array_equal, a, b)))))(restored.state.params,
                                                              state.params)
  assert bool(parallel.to_host(same)), 'restored params differ'
  if parallel.is_primary():
    (pathlib.Path(out_dir) / 'losses.json').write_text(json.dumps({
        'losses': losses, 'process_count': jax.process_count(),
        'device_count': jax.device_count()}))
  else:
    # Written by the other process only if is_primary were wrong; the test checks absence.
    assert not (pathlib.Path(out_dir) / 'losses_1.json').exists()


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
