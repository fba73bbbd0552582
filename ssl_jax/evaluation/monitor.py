"""kNN accuracy of the frozen encoder on a labelled split: the number that says whether
pre-training works. Labels are used here only, never for training."""

from __future__ import annotations

import dataclasses

import numpy as np

from ssl_jax.data import pipeline, sources
from ssl_jax.evaluation import features, knn


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
