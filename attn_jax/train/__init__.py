"""Model- and data-agnostic training machinery.

    config.full_config() -> the {optim, train, parallel} config sections (JAX-free)
    optim.make_optimizer(config.optim) -> (tx, schedule)
    state.create_train_state(init_params, tx, rng) -> TrainState
    step.make_train_step(loss_fn, tx, schedule) -> step(state, batch) -> (state, metrics)
    parallel.pmap_train_step / parallel.sharded_train_step wrap that step
    loop.train_loop(...) runs steps, eval, checkpoints, metrics and resume: a short driver of
      runner.Runner (the parallel mode) and the periodic actions of actions.py / evaluate.py.
    averaging.average_checkpoints(dir, abstract_state, last_n) -> (mean params, steps)

A task supplies `init_params(rng)` and `loss_fn(params, batch, rng, train) ->
(objective_sum, {name: (sum, count)})`; nothing here imports `attn_jax.models` or
`attn_jax.data` (tests/test_layers.py holds that rule). Names are exported lazily, so
`attn_jax.train.config` loads without JAX.
"""

from typing import TYPE_CHECKING

from attn_jax import _lazy

_EXPORTS = {
    'average_checkpoints': 'averaging', 'full_config': 'config', 'LoopResult': 'loop',
    'train_loop': 'loop',
    'TrainState': 'state', 'create_train_state': 'state',
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # Static analysers see the real names.
  from attn_jax.train.averaging import average_checkpoints
  from attn_jax.train.config import full_config
  from attn_jax.train.loop import LoopResult, train_loop
  from attn_jax.train.state import TrainState, create_train_state
