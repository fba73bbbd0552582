"""Stopping a run cleanly on SIGTERM or SIGINT (pre-emption, `scancel`, Ctrl-C).

While the training loop runs, `StopSignals` turns the first SIGTERM or SIGINT into a request:
the loop finishes the step in progress, writes a checkpoint, waits for it and returns, and
running the same command again resumes from it. A second signal of the same kind acts as it
would have without the handler (a second Ctrl-C raises KeyboardInterrupt at once).

On a multi-process run a signal may reach only some processes, or reach them at different
steps, yet all of them must checkpoint the same step and stop together (the checkpoint and the
train step are collective). `agree` makes the request global: each process contributes its flag
to a tiny all-gather and every process gets the same answer. The loop calls it only at steps
where the host waits for the devices anyway (log, checkpoint and in-flight-limit steps), so
agreeing costs no extra pipeline drain; a single process needs no agreement and stops after the
very step during which the signal came.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: while active, SIGTERM and SIGINT set `received` (the signal's name)
  instead of ending the process; on exit the previous handlers are back. Outside the main
  thread (where Python cannot install signal handlers) it does nothing and `received` stays
  None."""

  def __init__(self, signals=SIGNALS):
    self.signals = tuple(signals)
    self.received: str | None = None
    self._previous = {}
    self._seen = set()

  @property
  def requested(self) -> bool:
    return self.received is not None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.signals:
        # An ignored signal stays ignored (a shell starts background jobs with SIGINT
        # ignored, so that Ctrl-C in the terminal does not reach them).
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, previous in self._previous.items():
      # None: the previous handler was installed from C (jax.distributed's pre-emption
      # notifier, for one); Python cannot reinstall it, so the default takes its place.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if name not in self._seen:
      self._seen.add(name)
      self.received = self.received or name
      logging.warning('Received %s: stopping after the current step, once a checkpoint is '
                      'written. Send it again to stop at once, without a checkpoint.', name)
      return
    # The same signal again: do what it would have done without us.
    previous = self._previous.get(signum, signal.SIG_DFL)
    if callable(previous):
      previous(signum, frame)
    elif previous in (signal.SIG_DFL, None):
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)


def agree(local_request: bool) -> bool:
  """True on every process if any process requested a stop; the same answer everywhere.

  Every process must call it at the same step. One process: returns its own flag, no
  communication."""
  if jax.process_count() == 1:
    return bool(local_request)
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.asarray([local_request], np.int32))
  return bool(np.any(flags))
