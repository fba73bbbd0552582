"""Packages: ssl_jax, and the top-level configs/ folder installed as ssl_jax.configs, so that
configs compose by import (`from ssl_jax.configs import common, simclr`) wherever the command
runs. Everything else is in setup.cfg."""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=['ssl_jax', 'ssl_jax.*']) + ['ssl_jax.configs'],
    package_dir={'ssl_jax.configs': 'configs'},
)
