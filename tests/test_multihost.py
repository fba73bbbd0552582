"""Several processes on localhost under jax.distributed (gloo collectives on CPU) train to
the same parameters as one process with as many devices, and resume across a restart."""

import os
import subprocess
import sys

import numpy as np
import portpicker

WORKER = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def _launch(num_processes, workdir, out, stop_at_step=0):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, PYTHONPATH=ROOT, STOP_AT_STEP=str(stop_at_step))
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port),
                             workdir, out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-4000:]
  return [stdout for stdout, _ in outputs]


def _params(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: (len(k), k)) if k != 'step']


def test_two_processes_equal_one_and_resume(tmp_path):
  # 1 process x 2 devices: the reference. 2 processes x 2 devices: the same global batch of 16
  # split over 4 devices, each host reading its own half.
  single = str(tmp_path / 'single.npz')
  _launch(1, str(tmp_path / 'w1'), single)
  multi = str(tmp_path / 'multi.npz')
  stdout = _launch(2, str(tmp_path / 'w2'), multi, stop_at_step=2)
  assert 'devices 4 processes 2 step 2' in stdout[0]
  stdout = _launch(2, str(tmp_path / 'w2'), multi)   # resumes from step 2 on both hosts
  assert 'devices 4 processes 2 step 4' in stdout[0]
  for a, b in zip(_params(single), _params(multi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
