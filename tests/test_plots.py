"""Diagnostic figures render to non-blank RGB arrays and PNG files, without a display."""

import builtins
import subprocess
import sys

import numpy as np
import pytest
import threadpoolctl

from ssl_jax.evaluation import plots

H, W = int(plots.FIGSIZE[1] * plots.DPI), int(plots.FIGSIZE[0] * plots.DPI)


def _assert_image(image):
  assert image.shape == (H, W, 3)
  assert image.dtype == np.uint8
  assert image.var() > 0


def _spectrum(decay, dim=32):
  return np.exp(-np.arange(dim) / decay)


def test_importing_plots_does_not_import_matplotlib():
  # A fresh interpreter: this one has matplotlib loaded by the other tests.
  code = ('import sys, ssl_jax.evaluation.plots, ssl_jax.evaluation.lowlabel; '
          "sys.exit('matplotlib' in sys.modules)")
  assert subprocess.run([sys.executable, '-c', code], check=False).returncode == 0


def test_spectrum_figure():
  history = [(0, _spectrum(2.0)), (500, _spectrum(8.0)), (1000, np.zeros(32))]
  _assert_image(plots.figure_to_array(plots.spectrum_figure(history)))


def test_spectrum_figure_draws_one_line_per_step_in_step_colours():
  fig = plots.spectrum_figure([(0, _spectrum(2.0)), (1000, _spectrum(8.0))])
  lines = fig.axes[0].get_lines()
  assert len(lines) == 2
  assert lines[0].get_color() != lines[1].get_color()
  assert fig.axes[0].get_yscale() == 'log'
  assert len(fig.axes) == 2  # the plot and its colorbar


def test_alignment_uniformity_figure():
  history = [(0, 1.2, -0.5), (100, 0.8, -2.0), (200, 0.5, -3.1)]
  fig = plots.alignment_uniformity_figure(history)
  ax = fig.axes[0]
  assert 'uniformity' in ax.get_xlabel() and 'alignment' in ax.get_ylabel()
  np.testing.assert_allclose(ax.collections[0].get_offsets(), [[-0.5, 1.2], [-2.0, 0.8],
                                                               [-3.1, 0.5]])
  _assert_image(plots.figure_to_array(fig))


def test_single_entry_histories():
  _assert_image(plots.figure_to_array(plots.spectrum_figure([(7, _spectrum(4.0))])))
  _assert_image(plots.figure_to_array(plots.alignment_uniformity_figure([(7, 0.5, -2.0)])))
  with pytest.raises(ValueError):
    plots.spectrum_figure([])


@pytest.mark.parametrize('method', ['pca', 'tsne'])
def test_embedding_figure(method):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 40)
  features = rng.normal(size=(3, 8))[labels] * 3 + rng.normal(size=(120, 8))
  # One OpenMP thread: t-SNE's threads spin-wait, 30x slower on a shared, loaded machine.
  with threadpoolctl.threadpool_limits(1):
    fig = plots.embedding_figure(features, labels, class_names=['cat', 'dog', 'ship'],
                                 method=method)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['cat', 'dog', 'ship']
  assert sum(len(c.get_offsets()) for c in ax.collections) == 120
  _assert_image(plots.figure_to_array(fig))


def test_embedding_pca_separates_classes():
  labels = np.repeat(np.arange(2), 50)
  features = np.random.default_rng(1).normal(size=(100, 10)) * 0.1
  features[:, 3] += 5.0 * labels  # the dominant direction is the class
  ax = plots.embedding_figure(features, labels).axes[0]
  first, second = (c.get_offsets()[:, 0] for c in ax.collections)
  assert abs(first.mean() - second.mean()) > 4.0


def test_tsne_without_sklearn_says_how_to_fix(monkeypatch):
  real_import = builtins.__import__

  def no_sklearn(name, *args, **kwargs):
    if name.startswith('sklearn'):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_sklearn)
  for name in [m for m in sys.modules if m.startswith('sklearn')]:
    monkeypatch.delitem(sys.modules, name)
  with pytest.raises(ImportError, match='scikit-learn'):
    plots.embedding_figure(np.zeros((10, 3)), np.zeros(10, int), method='tsne')


def test_save_figure_writes_png(tmp_path):
  path = tmp_path / 'sub' / 'spectrum.png'
  plots.save_figure(plots.spectrum_figure([(0, _spectrum(2.0))]), path)
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  assert len(data) > 1000
