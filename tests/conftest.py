"""Test set-up: eight simulated CPU devices, so every test can check sharded against
single-device results. XLA reads the flag when jax initialises its backend, hence here,
before any test module imports jax."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Many tests build the same step again (a run, then its resumption; one config on several
# device counts): a compilation cache shared by the session, and by the subprocesses it
# starts, compiles each program once. A fresh directory per session keeps tests hermetic.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ssl_jax_test_xla_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  _OWN_CACHE_DIR = os.environ['JAX_COMPILATION_CACHE_DIR']
else:
  _OWN_CACHE_DIR = None

import shutil  # noqa: E402

import pytest  # noqa: E402

from tiny_config import make_tiny_config  # noqa: E402


@pytest.fixture
def tiny_config():
  return make_tiny_config()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE_DIR:
    shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
