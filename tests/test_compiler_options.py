"""The train step's XLA options (ssl_jax/compiler_options.py): YNNPACK for dots only on the CPU
for BatchNorm networks, XLA's defaults for the ViT, remat's options kept."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from ssl_jax import compiler_options, experiment
from ssl_jax.models import remat


def _model(name, **fields):
  import ml_collections
  return ml_collections.ConfigDict(dict(name=name, **fields))


def test_batchnorm_networks_get_ynnpack_dots_only_and_vits_the_defaults():
  dots_only = compiler_options.YNNPACK_DOTS_ONLY
  assert compiler_options.for_train_step(_model('convnet')) == dots_only
  assert compiler_options.for_train_step(_model('resnet18')) == dots_only
  assert compiler_options.for_train_step(_model('vit_micro')) is None
  # remat's own CPU options survive the merge, for a ViT too
  with_remat = compiler_options.for_train_step(_model('convnet', remat=True))
  assert with_remat == {**remat.CPU_COMPILER_OPTIONS, **dots_only}
  assert compiler_options.for_train_step(_model('vit_micro', remat=True)) == (
      remat.CPU_COMPILER_OPTIONS)


def test_evaluation_encoders_compile_with_the_models_options(tiny_config):
  # Feature extraction (FrozenEncoder.of_method) takes the YNNPACK option, not remat's.
  from ssl_jax.evaluation import features
  from ssl_jax.methods import build_method
  tiny_config.model.remat = True
  encoder = features.FrozenEncoder.of_method(build_method(tiny_config), None)
  assert dict(encoder.compiler_options) == compiler_options.YNNPACK_DOTS_ONLY
  assert compiler_options.for_encoder(_model('vit_micro')) == {}


def test_an_option_this_jaxlib_does_not_know_is_left_out(monkeypatch):
  # A jaxlib that renames the experimental option must still train, with XLA's defaults.
  monkeypatch.setattr(compiler_options, 'YNNPACK_DOTS_ONLY',
                      {'xla_cpu_experimental_ynn_fusion_type': 'NO_SUCH_FUSION_TYPE'})
  assert compiler_options.for_train_step(_model('convnet')) is None


def _ynnpack_fusions_with_reductions(hlo_text: str) -> list[str]:
  """Names of the YNNPACK fusions of a compiled module whose computation reduces."""
  bodies = dict(re.findall(r'\n(?:%)?(\S+) [^\n]*\{\n(.*?)\n\}', hlo_text, re.S))
  called = re.findall(r'(\S+) = \S+ fusion\([^\n]*kind=kCustom, calls=%?([\w.\-]+)', hlo_text)
  return [name for name, comp in called
          if 'ynn' in name and re.search(r'\breduce\(', bodies.get(comp, ''))]


def test_the_convnet_train_step_compiles_without_ynnpack_reductions(tiny_config):
  # First, that the check can see such fusions: under XLA's defaults a dense layer's
  # BatchNorm reduces in YNNPACK. A jaxlib that stops doing so fails here, and then
  # compiler_options.py has nothing left to turn off.
  def dense_batch_norm(w, x):
    y = x @ w
    return jnp.sum(((y - y.mean(0)) / y.std(0)) ** 2)
  x, w = jnp.ones((256, 16)), jnp.ones((16, 16))
  default = jax.jit(jax.grad(dense_batch_norm)).lower(w, x).compile().as_text()
  assert _ynnpack_fusions_with_reductions(default), 'XLA no longer reduces in YNNPACK'

  built = experiment.build(tiny_config, num_train_examples=1000, image_channels=1)
  state = jax.eval_shape(built.init_fn, jax.random.PRNGKey(0))
  images = jax.ShapeDtypeStruct((tiny_config.batch_size, 28, 28, 1), np.uint8)
  hlo = built.make_train_step().lower(state, images).compile().as_text()
  assert 'ynn_fusion' in hlo  # the dots still go to YNNPACK
  assert not _ynnpack_fusions_with_reductions(hlo)
