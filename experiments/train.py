r"""Trains and evaluates one experiment: a config file plus a work directory.

  PYTHONPATH=$PWD python experiments/train.py --config configs/algorithmic.py:task=reverse \
      --workdir /tmp/attn_jax/reverse --config.train.num_steps=3000

`--config path.py:arg` selects the experiment (see each config's docstring for its `:key=value`
arguments), `--config.<field>=value` overrides a number or string (unknown fields fail).
Re-running with the same workdir resumes from its latest checkpoint; a changed config that
alters the train state's shapes is refused (`--config.train.on_mismatch=restart` moves the old
run aside and starts over). A user error (bad flag or config value, bad data file, refused
re-run) prints one line and exits with status 2; `--verbosity=1` adds the traceback and the
libraries' INFO logs (orbax, jax, grain...), which the console leaves out by default.
Multi-host: set `--config.parallel.coordinator_address=host:port`, `num_processes`,
`process_id` (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
variables) and `--config.parallel.mode=sharded` on every host, with a shared workdir.
"""

from __future__ import annotations

from attn_jax.experiment import allocator

allocator.reexec_with_tcmalloc()  # ATTN_JAX_ALLOCATOR=tcmalloc; before JAX loads

import logging  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from attn_jax.experiment import cli, run  # noqa: E402
from attn_jax.train import parallel  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (path.py:arg).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and run files.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  # Before any other JAX call: joins the multi-host runtime when one is configured.
  parallel.initialize_distributed(config.parallel)
  # The full config goes to the workdir (config.json); the console gets what differs from the
  # config file's own values.
  logging.info(cli.config_summary(config_flags.get_config_filename(FLAGS['config']),
                                  config_flags.get_override_values(FLAGS['config']),
                                  FLAGS.workdir))
  if absl_logging.get_verbosity() < 1:  # TFDS's dataset-generation bars: with --verbosity=1.
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
  run.train_and_evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
