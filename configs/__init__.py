"""Experiment configs: one file per experiment, `get_config(arg)` and, where it has one,
`sweep()`. Launch with `python experiments/train.py --config configs/<name>.py:<arg>`.

Building a config imports no JAX (tests/configs/test_configs.py checks it): shared helpers are
in `common`, which imports only ml_collections, and the section defaults come from
`attn_jax.experiment.config`, which imports only JAX-free config modules.
"""
