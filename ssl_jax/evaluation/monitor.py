"""What training watches: kNN accuracy of the frozen encoder on a labelled split (the number
that says whether pre-training works; labels are used here only, never for training) and
the representation diagnostics that say whether it is collapsing."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ssl_jax.data import augment, pipeline, sources
from ssl_jax.evaluation import diagnostics, features, knn


@dataclasses.dataclass
class KnnEvaluator:
  bank_images: np.ndarray
  bank_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  k: int = 200
  temperature: float = 0.07
  batch_size: int = 1024
  image_size: int | None = None

  @classmethod
  def from_config(cls, config, bank_size: int | None = None, test_size: int | None = None):
    d = config.data
    bank = sources.get_source(d.name, d.eval_train_split, data_dir=d.data_dir,
                              download=d.download)
    test = sources.get_source(d.name, d.eval_split, data_dir=d.data_dir, download=d.download)
    bank_images, bank_labels = pipeline.make_eval_arrays(bank, max_examples=bank_size)
    test_images, test_labels = pipeline.make_eval_arrays(test, max_examples=test_size)
    return cls(bank_images, bank_labels, test_images, test_labels, k=config.eval.knn_k,
               temperature=config.eval.knn_temperature, batch_size=config.eval.batch_size,
               image_size=config.eval.image_size or None)

  @property
  def num_classes(self) -> int:
    return int(max(self.bank_labels.max(), self.test_labels.max()) + 1)

  def score_features(self, bank_features, test_features) -> float:
    return knn.knn_accuracy(bank_features, self.bank_labels, test_features, self.test_labels,
                            k=self.k, temperature=self.temperature,
                            num_classes=self.num_classes)

  def score_encoder(self, encode_fn) -> float:
    """encode_fn maps float images in [0, 1] to features."""
    extract = lambda images: features.extract_features(encode_fn, images, self.batch_size,
                                                       self.image_size)
    return self.score_features(extract(self.bank_images), extract(self.test_images))

  def score_raw_pixels(self) -> float:
    return self.score_features(features.raw_pixel_features(self.bank_images),
                               features.raw_pixel_features(self.test_images))


@dataclasses.dataclass
class DiagnosticsMonitor:
  """Representation diagnostics of the frozen encoder on a fixed set of test images.

  Effective rank, spread, uniformity and the spectrum are measured on the clean images at the
  evaluation resolution (the features a user gets); alignment on two augmented views of the
  same images made by the training augmentation (the pairs the loss pulls together), with a
  fixed key, so that successive measurements differ only by the encoder.
  """
  images: np.ndarray
  labels: np.ndarray
  view_cfgs: list
  min_rank_fraction: float = 0.05
  min_std_fraction: float = 0.05
  batch_size: int = 1024
  image_size: int | None = None
  seed: int = 0

  @classmethod
  def from_config(cls, config):
    d = config.data
    test = sources.get_source(d.name, d.eval_split, data_dir=d.data_dir, download=d.download)
    images, labels = pipeline.make_eval_arrays(test, max_examples=config.eval.diagnostics_size)
    e = config.eval
    return cls(images, labels, augment.view_configs(config.augment, 2)[:2],
               e.collapse_min_rank_fraction, e.collapse_min_std_fraction, e.batch_size,
               e.image_size or None, config.seed)

  def _views(self):
    if not hasattr(self, '_cached_views'):
      key = jax.random.PRNGKey(self.seed)
      self._cached_views = [
          np.asarray(v) for v in jax.jit(
              lambda k, x: augment.augment_views(k, x, self.view_cfgs))(key, self.images)]
    return self._cached_views

  def measure(self, encode_fn) -> tuple[dict, np.ndarray]:
    """diagnostics.representation_diagnostics of the encoder, plus 'collapse_warnings'
    (a list of messages, empty when healthy); and the clean images' features."""
    clean = features.extract_features(encode_fn, self.images, self.batch_size, self.image_size)
    view_features = [features.extract_features(encode_fn, v, self.batch_size)
                     for v in self._views()]
    result = {k: (np.asarray(v) if k == 'spectrum' else float(v)) for k, v in
              diagnostics.representation_diagnostics(clean, clean).items()}
    result['alignment'] = float(diagnostics.alignment(*view_features))
    result['collapse_warnings'] = diagnostics.collapse_warnings(
        result, self.min_rank_fraction, self.min_std_fraction)
    return result, clean
