"""Feature extraction from a frozen encoder, in fixed-size jitted batches."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: it holds arrays
class FrozenEncoder:
  """An encoder for evaluation: `apply(variables, float images in [0, 1]) -> features [B, D]`
  (pure) and the variables it runs with; calling it applies it to them.

  Evaluation jits `apply` with the variables as an argument, never closed over: jax cannot
  compile a closure over arrays that span other processes' devices, which every multi-host
  train state does (and, with `mesh.fsdp`, holds only in slices).

  `compiler_options`: XLA options for compiling `apply`, as (name, value) pairs
  (`ssl_jax.compiler_options.for_encoder`; hashable, for `jitted_encoder`'s cache).
  """
  apply: Callable
  variables: Any
  compiler_options: tuple[tuple[str, str], ...] = ()

  def __call__(self, images):
    return self.apply(self.variables, images)

  @classmethod
  def of_method(cls, method, variables) -> FrozenEncoder:
    """`method`'s encoder (`Method.frozen_apply`) with `variables` = (params, batch_stats),
    compiled with the options of its model."""
    from ssl_jax import compiler_options  # pylint: disable=g-import-not-at-top
    options = compiler_options.for_encoder(method.config.model)
    return cls(method.frozen_apply, variables, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=64)
def jitted_encoder(apply: Callable, image_size: int | None, compiler_options=(),
                   out_shardings=None) -> Callable:
  """`jax.jit` of (variables, images) -> apply(variables, preprocess(images, image_size)), one
  per set of arguments: evaluation calls it with the same shapes at every periodic
  evaluation, which then reuses the compiled executable (a new jit would trace and compile
  again, about a second per extraction for the default ConvNet on a CPU). `out_shardings`
  (with a mesh) also lays out two more arguments passed through, as `eval_data`'s sharded
  extraction has them."""
  options = dict(compiler_options) or None
  if out_shardings is None:
    return jax.jit(lambda v, x: apply(v, preprocess(x, image_size)), compiler_options=options)
  return jax.jit(lambda v, x, *rest: (apply(v, preprocess(x, image_size)), *rest),
                 out_shardings=out_shardings, compiler_options=options)


def local_copy(tree):
  """`tree` with every array whole on this process's first device: for computations that
  one process runs alone. Leaves split over devices are replicated first, a collective that
  every process must call."""
  arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  split = [x for x in arrays if not x.is_fully_replicated]
  if split:
    whole = jax.jit(lambda xs: xs, out_shardings=[
        NamedSharding(x.sharding.mesh, P()) for x in split])(split)
    replaced = {id(x): w for x, w in zip(split, whole)}
    tree = jax.tree.map(lambda x: replaced.get(id(x), x), tree)
  return jax.tree.map(
      lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def on_mesh(tree, mesh):
  """`tree` with every array on `mesh`'s devices: arrays there already stay as they are
  (split or not); others (a `local_copy`) are replicated over it from this process's value,
  which must be the same on every process."""
  devices = set(mesh.devices.flat)

  def put(x):
    if not isinstance(x, jax.Array) or x.sharding.device_set == devices:
      return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()),
                                        lambda index: value[index])
  return jax.tree.map(put, tree)


def encoder_parts(encode_fn, mesh=None) -> tuple[Callable, Any, tuple]:
  """(apply, variables, compiler_options) of a FrozenEncoder or a plain function of images
  (variables None, no options), with `apply(variables, images)` to jit: with a `mesh`, the
  variables on its devices (`on_mesh`), without, on this process's first device
  (`local_copy`)."""
  if isinstance(encode_fn, FrozenEncoder):
    variables = encode_fn.variables
    return encode_fn.apply, (local_copy(variables) if mesh is None else
                             on_mesh(variables, mesh)), encode_fn.compiler_options
  return (lambda _, images: encode_fn(images)), None, ()


def extract_features(encode_fn, images_uint8: np.ndarray, batch_size: int = 1024,
                     image_size: int | None = None) -> np.ndarray:
  """Applies `encode_fn(float_images) -> [B, D]` (a FrozenEncoder or a function) over uint8
  images [N, H, W, C] in batches, on this process's first device (float images are taken to
  be in [0, 1] already, e.g. augmented views).

  `image_size` resizes the images first (bilinear, antialiased), for encoders trained on
  crops of another resolution. The last batch is padded so that one compiled shape serves
  every batch.
  """
  apply, variables, options = encoder_parts(encode_fn)
  encode = jitted_encoder(apply, image_size, options)
  return map_padded_batches(lambda batch: encode(variables, batch), images_uint8, batch_size)


def map_padded_batches(fn, rows: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn` over `rows` in batches of `batch_size`, the last padded with zero rows so that one
  compiled shape serves every batch; the outputs of the real rows, concatenated."""
  outputs = []
  for start in range(0, len(rows), batch_size):
    batch = rows[start:start + batch_size]
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    outputs.append(np.asarray(fn(batch))[:batch_size - pad])
  return np.concatenate(outputs)


def preprocess(images, image_size: int | None = None):
  """What evaluation feeds an encoder: uint8 images scaled to float [0, 1] (float images are
  taken to be in [0, 1] already), resized to `image_size` (bilinear, antialiased) if set."""
  is_uint8 = images.dtype == np.uint8
  x = images.astype(np.float32) / 255.0 if is_uint8 else images.astype(np.float32)
  if image_size and image_size != x.shape[1]:
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), 'bilinear')
  return x


def raw_pixel_features(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.reshape(len(images_uint8), -1).astype(np.float32) / 255.0
