"""Processes that generate the same dataset at once (a sweep's parallel jobs) take turns: one
builds it, the others reuse it (TFDS alone fails the later ones with FileExistsError)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PARAMS = {'task': 'reverse', 'num_symbols': 8, 'train_length': [1, 6], 'test_length': [1, 8],
          'num_train': 400, 'num_validation': 20, 'num_test': 20, 'seed': 3}

SCRIPT = textwrap.dedent('''
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    from attn_jax.data import builders
    params, data_dir = json.loads(sys.argv[1]), sys.argv[2]
    builder = builders.prepare('algorithmic', params, data_dir)
    print(builder.info.splits['train'].num_examples)
''')


def test_concurrent_processes_prepare_a_dataset_once(tmp_path):
  procs = [subprocess.Popen([sys.executable, '-c', SCRIPT, json.dumps(PARAMS), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(3)]
  results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
  for code, out, err in results:
    assert code == 0, err[-3000:]
    assert out.split()[-1] == '400'  # after TFDS's own messages
  logs = ''.join(err for _, _, err in results)
  assert logs.count('INFO:root:Generating attn_jax_algorithmic') == 1, logs[-3000:]
  assert logs.count('INFO:root:Reusing attn_jax_algorithmic') == 2, logs[-3000:]
