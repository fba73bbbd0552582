"""Test set-up: eight simulated CPU devices, so every test can check sharded against
single-device results. XLA reads the flag when jax initialises its backend, hence here,
before any test module imports jax."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402

from tiny_config import make_tiny_config  # noqa: E402


@pytest.fixture
def tiny_config():
  return make_tiny_config()
