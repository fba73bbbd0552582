"""What training records about its representation while it runs: the diagnostics, the
collapse alarm, their history and plots in the workdir."""

from __future__ import annotations

import os

import jax
from absl import logging

from ssl_jax.evaluation import eval_data
from ssl_jax.evaluation.history import DiagnosticsHistory
from ssl_jax.evaluation.monitor import DiagnosticsMonitor


class RepresentationObserver:
  """Measures the representation diagnostics, raises the collapse alarm, logs the scalars and
  keeps the history and its plots in the workdir (process 0 writes files)."""

  def __init__(self, config, workdir: str, writer, resume_step: int,
               evaluation_plan: eval_data.EvalPlan | None = None):
    evaluation_plan = evaluation_plan or eval_data.plan(config)
    self.monitor = DiagnosticsMonitor.from_config(config, evaluation_plan)
    self.writer = writer
    self.plots = config.eval.plots
    self.chief = jax.process_index() == 0
    self.history = DiagnosticsHistory(workdir, resume_step) if self.chief else None
    self.class_names = evaluation_plan.class_names

  def __call__(self, step: int, encode_fn, final: bool = False) -> dict:
    measurement, clean_features = self.monitor.measure(encode_fn)
    warnings = measurement.pop('collapse_warnings')
    for message in warnings:
      logging.warning('Step %d: possible collapse: %s', step, message)
    scalars = {f'diagnostics/{k}': v for k, v in measurement.items() if k != 'spectrum'}
    scalars['diagnostics/collapse_alarm'] = float(bool(warnings))
    self.writer.write_scalars(step, scalars)
    if not self.chief:
      return scalars
    self.history.append(step, dict(measurement, collapse_warnings=warnings))
    if self.plots:
      from ssl_jax.evaluation import plots
      figures = self.history.figures()
      if final:
        figures['embedding'] = plots.embedding_figure(clean_features, self.monitor.labels,
                                                      self.class_names)
      os.makedirs(self.history.plots_dir, exist_ok=True)
      for name, figure in figures.items():
        self.writer.write_images(step, {f'plots/{name}': plots.figure_to_array(figure)[None]})
        plots.save_figure(figure, os.path.join(self.history.plots_dir, f'{name}.png'))
    return scalars
