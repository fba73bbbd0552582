"""The smallest config that trains: a few steps in seconds on CPU (shared by tests)."""

from ssl_jax.configs import simclr


def make_tiny_config():
  """A config small enough to train a few steps in seconds on CPU."""
  c = simclr.get_config('batch=32')
  c.model.name = 'convnet'
  c.model.widths = (4, 8)
  c.model.convs_per_stage = 1
  c.method.projector_hidden_dim = 16
  c.method.projector_output_dim = 8
  c.augment.crop_size = 12
  c.eval.image_size = 12
  c.total_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval.final_bank_size = 500
  c.eval.final_test_size = 100
  c.eval.baselines = False
  c.eval.diagnostics = c.eval.plots = False  # tests that check them turn them on
  return c
