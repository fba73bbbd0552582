"""What training watches: kNN accuracy of the frozen encoder on a labelled split (the number
that says whether pre-training works; labels are used here only, never for training) and
the representation diagnostics that say whether it is collapsing."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ssl_jax.data import augment
from ssl_jax.evaluation import diagnostics, eval_data, features, knn


@dataclasses.dataclass
class KnnEvaluator:
  """kNN top-1 of a frozen encoder: features of the bank and the queries are extracted batch
  by batch (`eval_data.stream_features`), sharded over `mesh` when given, and only the
  features are kept; the bank is sharded over the mesh for the search."""
  bank: eval_data.EvalSet
  queries: eval_data.EvalSet
  k: int = 200
  temperature: float = 0.07
  batch_size: int = 1024
  image_size: int | None = None
  mesh: Any = None
  num_classes: int | None = None

  @classmethod
  def from_config(cls, config, bank_size: int | None = None, test_size: int | None = None,
                  evaluation_plan: eval_data.EvalPlan | None = None, mesh=None):
    """The evaluator of `config`'s labelled evaluation sources, or None when it has none."""
    evaluation_plan = evaluation_plan or eval_data.plan(config)
    if not evaluation_plan.labelled:
      return None
    e = config.eval
    # Encoded images arrive centre-cropped to eval.image_size already (eval_data's
    # transform), so the resize in features.preprocess leaves them as they are.
    return cls(evaluation_plan.bank.limited(bank_size),
               evaluation_plan.queries.limited(test_size), k=e.knn_k,
               temperature=e.knn_temperature, batch_size=e.batch_size,
               image_size=e.image_size or None,
               mesh=mesh,
               num_classes=len(evaluation_plan.class_names) if evaluation_plan.class_names
               else None)

  def score_features(self, bank_features, bank_labels, test_features, test_labels) -> float:
    num_classes = self.num_classes or int(max(bank_labels.max(), test_labels.max()) + 1)
    return knn.knn_accuracy(bank_features, bank_labels, test_features, test_labels,
                            k=self.k, temperature=self.temperature, num_classes=num_classes,
                            mesh=self.mesh)

  def _features(self, encode_fn, raw_pixels=False):
    extract = lambda s: eval_data.stream_features(encode_fn, s, self.batch_size,
                                                  self.image_size, self.mesh, raw_pixels)
    return (*extract(self.bank), *extract(self.queries))

  def score_encoder(self, encode_fn) -> float:
    """encode_fn maps float images in [0, 1] to features."""
    return self.score_features(*self._features(encode_fn))

  def score_raw_pixels(self) -> float | None:
    """kNN on the raw pixels; None for images too large for a bank of pixels."""
    if self.bank.image_dims > eval_data.MAX_RAW_PIXEL_DIMS:
      return None
    return self.score_features(*self._features(None, raw_pixels=True))


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
  def from_config(cls, config, evaluation_plan: eval_data.EvalPlan | None = None):
    """On `eval.diagnostics_size` images of the evaluation plan's diagnostics set (the
    queries, or the training images when there are no labelled ones); encoded images are
    centre-cropped to the evaluation size first."""
    evaluation_plan = evaluation_plan or eval_data.plan(config)
    diagnostics_set = evaluation_plan.diagnostics
    images, labels = diagnostics_set.arrays()
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
