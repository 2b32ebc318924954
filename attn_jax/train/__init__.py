"""Model- and data-agnostic training machinery.

    optim.make_optimizer(config.optim) -> (tx, schedule)
    state.create_train_state(init_params, tx, rng) -> TrainState
    step.make_train_step(loss_fn, tx, schedule) -> step(state, batch) -> (state, metrics)
    parallel.pmap_train_step / parallel.sharded_train_step wrap that step
    loop.train_loop(...) runs steps, eval, checkpoints, metrics and resume.

A task supplies `init_params(rng)` and `loss_fn(params, batch, rng, train) ->
(objective_sum, {name: (sum, count)})`; nothing here knows a model or a dataset.
"""
