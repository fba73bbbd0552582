"""The quickstart notebook runs top to bottom, headless, in its tiny setting, and shows what
it promises: the evaluation table and the three plots."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'quickstart.ipynb')


@pytest.mark.slow  # 50-60 s; the train and evaluation code it calls is tested by default
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  workdir = tmp_path / 'quickstart'
  monkeypatch.setenv('SSL_JAX_QUICKSTART_TINY', '1')
  monkeypatch.setenv('SSL_JAX_QUICKSTART_WORKDIR', str(workdir))
  # One device in the kernel: the notebook is what a user runs, not a sharding test.
  monkeypatch.setenv('XLA_FLAGS', '')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}).execute()

  text = '\n'.join(output.get('text', '') for cell in notebook.cells
                   for output in cell.get('outputs', []))
  for row in ('trained encoder', 'random-init encoder', 'raw pixels'):
    assert row in text
  assert 'kNN' in text and '10% labels' in text
  images = [output for cell in notebook.cells for output in cell.get('outputs', [])
            if 'image/png' in output.get('data', {})]
  assert len(images) == 3
  for name in ('spectrum', 'alignment_uniformity', 'embedding'):
    assert (workdir / 'plots' / f'{name}.png').stat().st_size > 1000
  assert 'features: (8,' in text
