"""Where `python -m ssl_jax.evaluate` writes its results in a workdir; also read by
benchmarks/method_table.py, which must not import evaluate (its absl flags)."""

from __future__ import annotations

import os

EVALUATION_DIR = 'evaluation'


def _stem(step: int, image_size: int | None) -> str:
  # Scores at an image size other than the run's own sit beside the run's, named by it.
  return f'step_{step}' if image_size is None else f'step_{step}_{image_size}px'


def results_path(workdir: str, step: int, image_size: int | None = None) -> str:
  """evaluation/step_<step>.json, or step_<step>_<image_size>px.json when scored at
  `image_size` instead of the run's eval.image_size."""
  return os.path.join(workdir, EVALUATION_DIR, _stem(step, image_size) + '.json')


def embedding_plot_path(workdir: str, step: int, image_size: int | None = None) -> str:
  """The 2-D embedding plot beside `results_path`."""
  return os.path.join(workdir, EVALUATION_DIR, f'embedding_{_stem(step, image_size)}.png')
