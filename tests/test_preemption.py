"""Pre-emption: SIGTERM/SIGINT stop a run after a checkpoint and the same command resumes it
exactly; SIGKILL in the middle of an asynchronous save leaves the previous checkpoint."""

import glob
import os
import shlex
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ssl_jax import checkpoint, config_lib, pretrained, preemption, train

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
TINY = ['--config=configs/simclr.py', '--config.batch_size=32', '--config.model.name=convnet',
        '--config.model.widths=(4,8)', '--config.model.convs_per_stage=1',
        '--config.method.projector_hidden_dim=16', '--config.method.projector_output_dim=8',
        '--config.augment.crop_size=12', '--config.eval.final_bank_size=500',
        '--config.eval.final_test_size=100', '--config.eval.baselines=False',
        '--config.eval.diagnostics=False', '--config.eval.plots=False']
RESUME_HINT = 'To resume, run the same command again:'


def _env():
  # Two devices; the compilation cache of the test session (conftest) is inherited.
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')


def _start(args, log_path, program=('-m', 'ssl_jax.main'), env=None):
  """Starts a training process; its stderr goes to `log_path`, which the test can poll."""
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, *program, *args], cwd=ROOT, env=env or _env(),
                          stdout=subprocess.PIPE, stderr=log, text=True)
  proc.log = log
  return proc


def _finish(proc, timeout=600):
  stdout, _ = proc.communicate(timeout=timeout)
  proc.log.close()
  with open(proc.log.name) as f:
    return proc.returncode, stdout, f.read()


def _wait_for(condition, proc, what, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f'the run ended before {what}: {_finish(proc)[2][-3000:]}')
    assert time.monotonic() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.02)


def _assert_states_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.fixture
def python_sigint():
  """SIGINT handled as in a plain `python` process (KeyboardInterrupt) for the test: the
  pytest-xdist workers that run the suite ignore SIGINT."""
  original = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, original)


def test_stop_signals_request_a_stop_then_act_as_before(python_sigint):
  previous = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  with preemption.StopSignals() as signals:
    assert not signals.requested
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in this (the main) thread at the next bytecode
    assert signals.received == 'SIGTERM'
    os.kill(os.getpid(), signal.SIGINT)  # another signal: still the first request
    time.sleep(0.05)
    assert signals.received == 'SIGTERM'
    with pytest.raises(KeyboardInterrupt):  # the same signal again: what it did before
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == previous
  assert preemption.agree(True) and not preemption.agree(False)  # one process: its own flag


def test_sigterm_checkpoints_and_the_same_command_resumes_exactly(tmp_path):
  """A real SIGTERM in the middle of training: the run finishes its step, writes a checkpoint
  of it, exits with 128 + 15 and prints the command; that command resumes from the
  checkpoint and ends with exactly the parameters of an uninterrupted run."""
  total = 300
  # No periodic checkpoint: the one to resume from is the stop's own. (The host mostly waits at
  # log steps, so that is where a signal tends to land; a checkpoint every 10 steps would make
  # a stop that forgets its checkpoint look right.)
  args = TINY + [f'--config.total_steps={total}', '--config.checkpoint_every_steps=1000',
                 '--config.log_every_steps=10']
  workdir = str(tmp_path / 'interrupted')
  # The uninterrupted reference runs alongside (the machine's cores overlap their start-up).
  straight = _start(args + [f'--workdir={tmp_path / "straight"}'], tmp_path / 'straight.log')
  run = _start(args + [f'--workdir={workdir}'], tmp_path / 'interrupted.log')
  # Once step 10 is logged, the run is well inside its loop.
  _wait_for(lambda: f'step 10/{total}: loss' in open(run.log.name).read(), run,
            'log of step 10')
  run.send_signal(signal.SIGTERM)
  returncode, stdout, stderr = _finish(run)
  assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'kNN top-1' not in stdout  # no final evaluation
  stopped = [line for line in stderr.splitlines() if line.startswith('Stopped by SIGTERM')]
  assert len(stopped) == 1, stderr[-3000:]
  stop_step = int(stopped[0].split(' at step ')[1].split(';')[0])
  assert 10 <= stop_step < total, stopped  # a step of the loop, not the end of the run
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == stop_step
  # The printed command is the one that was run.
  command = shlex.split(stderr.split(RESUME_HINT)[1].strip().splitlines()[0])
  assert command[1:3] == ['-m', 'ssl_jax.main'] and command[3:] == args + [f'--workdir={workdir}']

  at_stop = jax.device_get(pretrained.load(workdir).state)
  assert int(at_stop.step) == stop_step

  command[0] = sys.executable
  resumed = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'starting at step {stop_step}.' in resumed.stderr
  logged = [int(line.split('step ')[1].split('/')[0]) for line in resumed.stderr.splitlines()
            if f'/{total}: loss' in line]
  assert logged and min(logged) > stop_step and max(logged) == total  # only the steps left
  assert resumed.stdout.startswith('kNN top-1')
  returncode, _, stderr = _finish(straight)
  assert returncode == 0, stderr[-3000:]

  a, b = pretrained.load(workdir), pretrained.load(str(tmp_path / 'straight'))
  assert a.step == b.step == total
  _assert_states_equal(a.state, b.state)
  with pytest.raises(AssertionError):  # not vacuous: the steps after the stop changed it
    _assert_states_equal(at_stop.params, a.state.params)


def test_sigkill_during_an_asynchronous_save_leaves_the_previous_checkpoint(tmp_path):
  workdir = str(tmp_path)
  args = TINY + ['--config.total_steps=4', '--config.checkpoint_every_steps=2',
                 '--config.log_every_steps=2', f'--workdir={workdir}']
  run = _start(args, tmp_path / 'killed.log', program=('tests/hang_save_main.py',),
               env=dict(_env(), HANG_SAVE_FROM_STEP='4'))
  _wait_for(lambda: 'HANGING SAVE 4' in open(run.log.name).read(), run, 'save of step 4')
  run.kill()  # SIGKILL: no handler, no clean-up
  returncode, _, _ = _finish(run)
  assert returncode == -signal.SIGKILL
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert glob.glob(os.path.join(ckpt_dir, '4.orbax-checkpoint-tmp*'))  # killed mid-save
  assert checkpoint.Checkpointer(ckpt_dir).all_steps() == [2]
  # The same run resumes from step 2 (here in-process, on this session's 8 devices).
  config = config_lib.load_json(os.path.join(workdir, train.CONFIG_FILE))
  state, results = train.train_and_evaluate(config, workdir)
  assert results['restored_step'] == 2 and results['steps_run'] == 2
  assert int(state.step) == 4 and 'knn_top1' in results
  assert checkpoint.Checkpointer(ckpt_dir).latest_step() == 4
