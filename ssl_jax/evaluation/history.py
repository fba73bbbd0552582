"""The diagnostics history of a run: one JSON line per measurement in the workdir, and the
plots drawn from it.

The history outlives the process: a resumed run drops the lines measured after the checkpoint
it restored (they will be measured again) and appends, so the file and its plots always
describe the run as if it had never stopped.
"""

from __future__ import annotations

import json
import os

import numpy as np

HISTORY_FILE = 'diagnostics.jsonl'
PLOTS_DIR = 'plots'


def _jsonable(value):
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


class DiagnosticsHistory:

  def __init__(self, workdir: str, resume_step: int = 0):
    """Loads `workdir`'s history, keeping only measurements at steps <= `resume_step`."""
    self.path = os.path.join(workdir, HISTORY_FILE)
    self.plots_dir = os.path.join(workdir, PLOTS_DIR)
    self.entries = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.entries = [json.loads(line) for line in f if line.strip()]
      self.entries = [e for e in self.entries if e['step'] <= resume_step]
      self._rewrite()

  def _rewrite(self):
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for entry in self.entries:
        f.write(json.dumps(entry) + '\n')
    os.replace(tmp, self.path)

  def append(self, step: int, measurement: dict) -> None:
    entry = {'step': int(step)}
    entry.update({k: _jsonable(v) for k, v in measurement.items()})
    self.entries = [e for e in self.entries if e['step'] != step] + [entry]
    self._rewrite()

  def figures(self) -> dict:
    """{name: matplotlib figure} of the spectrum over training and the alignment-uniformity
    trajectory."""
    from ssl_jax.evaluation import plots
    return {
        'spectrum': plots.spectrum_figure(
            [(e['step'], np.asarray(e['spectrum'])) for e in self.entries]),
        'alignment_uniformity': plots.alignment_uniformity_figure(
            [(e['step'], e['alignment'], e['uniformity']) for e in self.entries]),
    }
