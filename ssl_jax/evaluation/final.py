"""The trainer's final evaluation: kNN of the trained encoder next to its baselines."""

from __future__ import annotations

from ssl_jax.evaluation import eval_data, image_text_eval
from ssl_jax.evaluation.batch_norm import refreshed_frozen_encoder
from ssl_jax.evaluation.monitor import KnnEvaluator
from ssl_jax.methods import frozen_encoder


def final_evaluation(config, method, state, initial_state=None,
                     evaluation_plan: eval_data.EvalPlan | None = None, mesh=None) -> dict:
  """kNN top-1 on the full evaluation split, with the raw-pixel and random-init baselines
  (and for image-text methods zero-shot accuracy, retrieval recall, the modality gap:
  `image_text_eval`); empty when the evaluation plan has no labelled images.

  The random-init encoder (`initial_state`) is scored with its BatchNorm statistics refreshed
  on `eval.bn_refresh_batches` training batches (`evaluation.batch_norm`): at their initial
  values (mean 0, variance 1) its score would swing with the seed. The raw-pixel baseline is
  left out for images too large to hold a bank of their pixels."""
  evaluator = KnnEvaluator.from_config(config, config.eval.final_bank_size or None,
                                       config.eval.final_test_size or None, evaluation_plan,
                                       mesh)
  if evaluator is None:
    return {}
  results = {'knn_top1': evaluator.score_encoder(frozen_encoder(method, state))}
  if image_text_eval.is_image_text(method):
    results.update(image_text_eval.image_text_evaluation(config, method, state,
                                                         evaluator.queries))
  if initial_state is not None:
    results['knn_top1_random_init'] = evaluator.score_encoder(
        refreshed_frozen_encoder(config, method, initial_state))
    raw = evaluator.score_raw_pixels()
    if raw is not None:
      results['knn_top1_raw_pixels'] = raw
  return results
