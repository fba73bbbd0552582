"""Every method under the same CPU budget: kNN top-1 on the Fashion-MNIST test split.

  python benchmarks/method_table.py [--epochs=4] [--methods=simclr,byol,...] \
      [--root=workdirs/method_table]

Trains each method's default config (the Fashion-MNIST CPU recipe: the same ConvNet, crops
and evaluation) for the same number of epochs, one subprocess each, exactly as the command in
the table's last column does, and prints a Markdown table: kNN top-1 of the trained encoder
(bank: the 60,000 training images, queries: the 10,000 test images) next to the same network
at random initialisation, the final representation diagnostics, and the wall time of the
whole command. A workdir that already holds results.json is read, not retrained, so an
interrupted table resumes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
FLAGS = flags.FLAGS
DEFAULT_METHODS = ('simclr', 'simclr_debiased', 'simclr_hard_negatives', 'simclr_decoupled',
                   'moco_v1', 'moco_v2', 'moco_v3', 'byol', 'simsiam', 'swav', 'dino',
                   'barlow_twins', 'vicreg', 'nnclr', 'adco', 'triplet', 'hyperbolic', 'mae',
                   'deepcluster_v2', 'pcl', 'ibot')
flags.DEFINE_list('methods', list(DEFAULT_METHODS), 'Configs (configs/<name>.py) to run.')
flags.DEFINE_float('epochs', 4.0, 'Training epochs for every method.')
flags.DEFINE_string('root', os.path.join(ROOT, 'workdirs', 'method_table'),
                    'Parent directory of the workdirs.')


def command(name: str, epochs: float, workdir: str) -> list[str]:
  return [sys.executable, '-m', 'ssl_jax.main', f'--config=configs/{name}.py:epochs={epochs:g}',
          f'--workdir={workdir}']


def run_one(name: str, epochs: float, workdir: str) -> dict:
  results_path = os.path.join(workdir, 'results.json')
  seconds = None
  if not os.path.exists(results_path):
    start = time.monotonic()
    done = subprocess.run(command(name, epochs, workdir), cwd=ROOT, capture_output=True,
                          text=True)
    seconds = time.monotonic() - start
    if done.returncode != 0:
      return {'error': done.stderr.strip().splitlines()[-1] if done.stderr else 'failed'}
  with open(results_path) as f:
    results = json.load(f)
  if seconds is not None:
    results['seconds'] = seconds
    with open(results_path, 'w') as f:
      json.dump(results, f, indent=2)
  return results


def main(argv):
  del argv
  rows = []
  for name in FLAGS.methods:
    workdir = os.path.join(FLAGS.root, name)
    results = run_one(name, FLAGS.epochs, workdir)
    rows.append((name, results))
    print(f'{name}: {results}', file=sys.stderr, flush=True)
  print(f'| config ({FLAGS.epochs:g} epochs) | kNN top-1 | random-init kNN | eff. rank | '
        'spread | minutes | command |')
  print('|---|---|---|---|---|---|---|')
  for name, r in rows:
    shown = ' '.join(command(name, FLAGS.epochs, f'workdirs/{name}')[3:])
    if 'error' in r:
      print(f'| `{name}` | failed: {r["error"]} | | | | | `ssl-jax-train {shown}` |')
      continue
    minutes = f'{r["seconds"] / 60:.1f}' if r.get('seconds') else '-'
    random_init = r.get('knn_top1_random_init', float('nan'))
    print(f'| `{name}` | **{r["knn_top1"]:.4f}** | {random_init:.4f} '
          f'| {r.get("diagnostics/effective_rank", float("nan")):.1f} '
          f'| {r.get("diagnostics/std_fraction", float("nan")):.2f} | {minutes} '
          f'| `ssl-jax-train {shown}` |')


if __name__ == '__main__':
  app.run(main)
