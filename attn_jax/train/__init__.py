"""Model- and data-agnostic training machinery.

    optim.make_optimizer(config.optim) -> (tx, schedule)
    state.create_train_state(init_params, tx, rng) -> TrainState
    step.make_train_step(loss_fn, tx, schedule) -> step(state, batch) -> (state, metrics)
    parallel.pmap_train_step / parallel.sharded_train_step wrap that step
    loop.train_loop(...) runs steps, eval, checkpoints, metrics and resume.

A task supplies `init_params(rng)` and `loss_fn(params, batch, rng, train) ->
(objective_sum, {name: (sum, count)})`; nothing here knows a model or a dataset.
"""

from attn_jax.train import (
    checkpoint,
    config_args,
    loop,
    losses,
    metrics,
    optim,
    parallel,
    state,
    step,
)
from attn_jax.train.loop import LoopResult, full_config, train_loop
from attn_jax.train.state import TrainState, create_train_state

__all__ = [
    'LoopResult', 'TrainState', 'checkpoint', 'config_args', 'create_train_state', 'full_config',
    'loop', 'losses', 'metrics', 'optim', 'parallel', 'state', 'step', 'train_loop',
]
