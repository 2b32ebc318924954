"""Test setup shared by every test module.

Eight fake CPU devices, so pmap/mesh code is tested without accelerators. This
must happen before jax is imported anywhere, hence at conftest import time.
"""

import os

_FLAG = '--xla_force_host_platform_device_count=8'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# The suite compiles hundreds of small programs and runs each a few times: XLA's LLVM
# optimisation costs more than it saves there (16-30% off the slowest smoke tests, measured),
# as flax found for its own tests. JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the optimised code.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
