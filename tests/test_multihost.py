"""Several processes on localhost under jax.distributed (gloo collectives on CPU) train to
the same losses and parameters as one process with as many devices, stop together when one of
them gets SIGTERM, and resume across a restart."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

WORKER = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))


def _launch(num_processes, workdir, out, sigterm_at_step=0, fsdp=1):
  """Runs the worker on `num_processes` processes; returns each one's RESULT dict."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ, PYTHONPATH=ROOT, SIGTERM_AT_STEP=str(sigterm_at_step),
             FSDP=str(fsdp))
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port),
                             workdir, out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outputs):
    assert p.returncode == 0, stderr[-4000:]
  return [json.loads(stdout.strip().splitlines()[-1].removeprefix('RESULT '))
          for stdout, _ in outputs]


def _params(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: (len(k), k)) if k != 'step']


# Rounding differences between the runs' reduction orders (one process or two, XLA's loops or
# YNNPACK's) scale with a leaf's magnitude, not each element's: an element near zero in a leaf
# of scale 1 carries the leaf's rounding. After 4 steps they stay under 3e-6 on leaves of
# scale 1.5; a wrong leaf differs by orders of magnitude more.
RTOL, ATOL_PER_SCALE = 1e-4, 1e-5


# fsdp=4: the state split over all 4 devices, so each leaf spans both processes (their
# gathers, reduce-scatters and checkpoint writes cross hosts); fsdp=1: replicated state.
@pytest.mark.parametrize('fsdp', [4, pytest.param(1, marks=pytest.mark.slow)])
def test_two_processes_equal_one_and_resume(tmp_path, fsdp):
  # 1 process x 2 devices, replicated state: the reference. 2 processes x 2 devices: the same
  # global batch of 16 split over 4 devices, each host reading its own half. SGD without
  # warm-up (the worker): the parameters move far from where they started at every step.
  single = str(tmp_path / 'single.npz')
  [reference] = _launch(1, str(tmp_path / 'w1'), single)
  assert reference['step'] == 4 and reference['restored_step'] is None
  # A SIGTERM to the second process only, after step 2: both processes agree to stop there
  # and checkpoint step 2.
  interrupted = str(tmp_path / 'interrupted.npz')
  first = _launch(2, str(tmp_path / 'w2'), interrupted, sigterm_at_step=2, fsdp=fsdp)
  assert [r['stopped_by'] for r in first] == ['a signal to another process', 'SIGTERM']
  for r in first:
    assert (r['devices'], r['processes'], r['step'], r['steps_run']) == (4, 2, 2, 2)
  multi = str(tmp_path / 'multi.npz')
  second = _launch(2, str(tmp_path / 'w2'), multi, fsdp=fsdp)   # resumes from step 2 on both hosts
  for r in second:  # restored the checkpoint of step 2 and trained only steps 3 and 4
    assert (r['step'], r['restored_step'], r['steps_run'], r['stopped_by']) == (4, 2, 2, None)
    # Evaluation features streamed over both hosts' devices (each reading its rows of every
    # batch, the last one padded) come in order with their labels, equal to one process
    # reading every row itself.
    streamed = r['streamed']
    assert streamed['rows'] == 100 and streamed['labels_equal']
    assert streamed['max_difference'] <= 1e-5 * streamed['max_feature']
  # The loss of every step, on both processes, equals the one-process run's.
  expected = [reference['losses'][str(k)] for k in range(1, 5)]
  for p in range(2):
    losses = {**first[p]['losses'], **second[p]['losses']}
    assert sorted(losses, key=int) == ['1', '2', '3', '4']
    np.testing.assert_allclose([losses[str(k)] for k in range(1, 5)], expected, rtol=1e-5)
  leaves, at_step_2 = _params(multi), _params(interrupted)
  for a, b, c in zip(_params(single), leaves, at_step_2):
    atol = ATOL_PER_SCALE * np.max(np.abs(a))
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=atol)
    # Not vacuous: steps 3 and 4 moved every leaf by far more than the tolerance.
    assert np.max(np.abs(b - c) / (atol + RTOL * np.abs(a))) > 100
  assert len(leaves) == len(at_step_2) > 0
