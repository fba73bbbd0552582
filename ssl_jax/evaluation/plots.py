"""Figures of the diagnostics, as image arrays (TensorBoard) or PNG files.

Figures are built with matplotlib's object API on an Agg canvas, never through pyplot: no
display is needed, the user's pyplot backend (e.g. a notebook's) is left alone, and a figure
is freed as soon as it is unreferenced instead of piling up in pyplot's registry over a long
run. matplotlib is imported inside the functions, so importing ssl_jax does not need it.

- spectrum: eigenvalues of the embedding covariance, whose tail falls to 0 under dimensional
  collapse (Jing et al. 2022, "Understanding Dimensional Collapse in Contrastive
  Self-supervised Learning", fig. 2).
- alignment vs uniformity: Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere", fig. 5.
"""

from __future__ import annotations

import os
import sys

import numpy as np

FIGSIZE = (6.4, 4.8)
DPI = 100


def _new_figure(figsize=FIGSIZE):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  return fig


def _step_colors(steps):
  """A ScalarMappable from step to colour (`to_rgba`) that also draws the colorbar."""
  from matplotlib import cm, colors
  steps = np.asarray(steps, np.float64)
  # A single step would give an empty range, which Normalize maps to NaN.
  norm = colors.Normalize(vmin=steps.min(), vmax=max(steps.max(), steps.min() + 1))
  return cm.ScalarMappable(norm=norm, cmap='viridis')


def spectrum_figure(history):
  """Covariance eigenvalues (descending, log scale) against their index, one line per
  (step, eigenvalues) of `history`, coloured by step."""
  if not history:
    raise ValueError('spectrum_figure needs at least one (step, eigenvalues) entry.')
  mappable = _step_colors([step for step, _ in history])
  spectra = [np.sort(np.asarray(values, np.float64))[::-1] for _, values in history]
  # A log axis cannot show 0, and float32 eigenvalues below ~1e-7 of the largest are
  # rounding noise: collapsed directions sit on one shared floor instead.
  floor = max(max(s.max() for s in spectra), 1e-30) * 1e-9
  fig = _new_figure()
  ax = fig.add_subplot()
  for (step, _), spectrum in zip(history, spectra):
    ax.plot(np.arange(1, len(spectrum) + 1), np.maximum(spectrum, floor),
            color=mappable.to_rgba(step), lw=1.2)
  ax.set_yscale('log')
  ax.set_xlabel('index k (eigenvalues in descending order)')
  ax.set_ylabel('eigenvalue of the embedding covariance (log)')
  ax.set_title('Embedding spectrum: a tail falling to 0 is dimensional collapse')
  fig.colorbar(mappable, ax=ax, label='step')
  return fig


def alignment_uniformity_figure(history):
  """The training trajectory in the (uniformity, alignment) plane of Wang & Isola 2020, one
  point per (step, alignment, uniformity) of `history`, coloured by step."""
  if not history:
    raise ValueError('alignment_uniformity_figure needs at least one '
                     '(step, alignment, uniformity) entry.')
  steps, align, uniform = (np.asarray(column, np.float64) for column in zip(*history))
  mappable = _step_colors(steps)
  fig = _new_figure()
  ax = fig.add_subplot()
  ax.plot(uniform, align, color='0.7', lw=1.0, zorder=1)
  ax.scatter(uniform, align, c=mappable.to_rgba(steps), s=30, edgecolors='k',
             linewidths=0.4, zorder=2)
  ax.annotate(f'step {steps[-1]:g}', (uniform[-1], align[-1]), textcoords='offset points',
              xytext=(5, 5), fontsize=8)
  ax.set_xlabel('uniformity  log E exp(-2 ||f(x)-f(y)||²)  (lower is better)')
  ax.set_ylabel('alignment  E ||f(x)-f(x⁺)||²  (lower is better)')
  ax.set_title('Alignment vs uniformity (Wang & Isola 2020): lower-left is better')
  fig.colorbar(mappable, ax=ax, label='step')
  return fig


def _project_2d(features, method, seed):
  features = np.asarray(features, np.float64).reshape(len(features), -1)
  if method == 'pca':
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    # An SVD's signs are arbitrary; fixing them keeps plots of successive steps comparable.
    signs = np.sign(components[np.arange(len(components)),
                               np.argmax(np.abs(components), axis=1)])
    projected = centred @ (components * signs[:, None]).T
    if projected.shape[1] < 2:  # one-dimensional features
      projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected
  if method == 'tsne':
    try:
      from sklearn.manifold import TSNE
    except ImportError as e:
      raise ImportError("embedding_figure(method='tsne') needs scikit-learn "
                        "(pip install scikit-learn); method='pca' needs nothing.") from e
    # t-SNE requires perplexity < N; 30 is its default for larger sets.
    perplexity = min(30.0, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init='pca',
                random_state=seed).fit_transform(features)
  raise ValueError(f"Unknown method {method!r}; use 'pca' or 'tsne'.")


def embedding_figure(features, labels, class_names=None, method: str = 'pca', seed: int = 0):
  """Scatter of a 2-D projection ('pca': the first two principal components, cheap; 'tsne':
  scikit-learn's t-SNE, slow on large sets) of `features` [N, D], coloured by class."""
  labels = np.asarray(labels)
  points = _project_2d(features, method, seed)
  classes = np.unique(labels)
  cmap = 'tab10' if len(classes) <= 10 else 'tab20' if len(classes) <= 20 else 'turbo'
  from matplotlib import colormaps
  palette = colormaps[cmap].resampled(max(len(classes), 2))
  fig = _new_figure()
  ax = fig.add_subplot()
  for i, c in enumerate(classes):
    members = labels == c
    if c < 0:  # unlabelled images (label -1)
      name = 'unlabelled'
    else:
      name = class_names[int(c)] if class_names is not None else str(c)
    ax.scatter(points[members, 0], points[members, 1], s=6, color=palette(i), label=name,
               alpha=0.8, linewidths=0)
  # Beyond 20 classes a legend would hide the plot.
  if len(classes) <= 20:
    ax.legend(loc='best', fontsize=7, markerscale=2, frameon=False)
  title = {'pca': 'PCA', 'tsne': 't-SNE'}[method]
  coloured = ', coloured by class' if (classes >= 0).any() else ''
  ax.set_title(f'{title} of the test embeddings{coloured}')
  ax.set_xlabel(f'{title} 1')
  ax.set_ylabel(f'{title} 2')
  return fig


def figure_to_array(fig) -> np.ndarray:
  """The rendered figure as uint8 RGB [H, W, 3], e.g. for a TensorBoard image summary."""
  if not hasattr(fig.canvas, 'buffer_rgba'):  # a figure made elsewhere, without Agg
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
  fig.canvas.draw()
  return np.array(fig.canvas.buffer_rgba())[..., :3]


def save_figure(fig, path) -> None:
  """Writes `fig` to `path` as PNG (creating parent directories) and closes it."""
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format='png', dpi=DPI)
  # Only figures made through pyplot are held by it; ours are freed when unreferenced.
  if 'matplotlib.pyplot' in sys.modules:
    sys.modules['matplotlib.pyplot'].close(fig)
