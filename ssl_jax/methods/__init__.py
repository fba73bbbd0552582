"""Method registry: config.method.name -> the class implementing `base.Method`."""

from ssl_jax.methods.simclr import SimCLR

METHODS = {
    'simclr': SimCLR,
}


def build_method(config):
  name = config.method.name
  if name not in METHODS:
    raise ValueError(f'Unknown method.name {name!r}; known: {sorted(METHODS)}.')
  return METHODS[name](config)
