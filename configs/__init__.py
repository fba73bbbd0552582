"""Experiment configs, one per method (`get_config(arg)`), importable as `ssl_jax.configs`
(setup.py maps this folder there) so that they compose by import: `common` holds what they
share, and a variant imports its base (`from ssl_jax.configs import simclr`)."""
