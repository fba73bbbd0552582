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

--rescore scores each row's encoder as its config evaluates today: where the config's
`eval.image_size` differs from the one the workdir was trained with (configs/common.py's
ConvNet recipe moved from 20 to the whole 28-pixel images), the kNN, random-init kNN and
diagnostics come from `python -m ssl_jax.evaluate --evals=knn,diagnostics
--image_size=<today's>` on the workdir (run once: its evaluation/step_<N>_<size>px.json is
read after that); the minutes stay the training command's.
"""

from __future__ import annotations

import importlib
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
flags.DEFINE_bool('rescore', False, "Score each encoder at its config's evaluation size of "
                  'today where its workdir was trained with another (module docstring).')


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


def rescored(name: str, epochs: float, workdir: str, results: dict) -> dict:
  """`results` with the kNN and diagnostics of the encoder at configs/<name>.py's evaluation
  size of today, where the workdir's own differs (module docstring)."""
  from ssl_jax import config_lib
  from ssl_jax.evaluation import result_files
  size = importlib.import_module(f'ssl_jax.configs.{name}').get_config(
      f'epochs={epochs:g}').eval.image_size
  trained_size = config_lib.load_json(os.path.join(workdir, 'config.json')).eval.image_size
  if size == trained_size:
    return results
  path = result_files.results_path(workdir, results['step'], size)
  if not os.path.exists(path):
    done = subprocess.run(
        [sys.executable, '-m', 'ssl_jax.evaluate', f'--workdir={workdir}',
         '--evals=knn,diagnostics', f'--image_size={size}', '--embedding=none'],
        cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
      return {'error': done.stderr.strip().splitlines()[-1] if done.stderr else 'failed'}
  with open(path) as f:
    rows = json.load(f)['rows']
  trained = rows['trained encoder']
  return dict(results, knn_top1=trained['knn_top1'],
              knn_top1_random_init=rows['random-init encoder']['knn_top1'],
              knn_top1_raw_pixels=rows['raw pixels']['knn_top1'],
              **{f'diagnostics/{k}': trained[k] for k in ('effective_rank', 'std_fraction')},
              eval_image_size=size)


def main(argv):
  del argv
  rows = []
  for name in FLAGS.methods:
    workdir = os.path.join(FLAGS.root, name)
    results = run_one(name, FLAGS.epochs, workdir)
    if FLAGS.rescore and 'error' not in results:
      results = rescored(name, FLAGS.epochs, workdir, results)
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
