"""Preemption: SIGTERM / SIGINT -> a checkpoint at the current step, then a clean exit.

A stage's batches depend only on (seed, step) and its randomness is
``fold_in(seed, step)``, so the step *is* the data iterator's position and the
RNG state: a checkpoint at the current step is all an exact resume needs.

One process: the signal sets a flag that the loop reads after every step.
Several processes: all must stop at the same step. JAX's preemption service
(started by ``jax.distributed.initialize``) catches SIGTERM on any process, tells
the others, and ``multihost_utils.reached_preemption_sync_point(step)`` turns True
on every process at the same step (the one Orbax also checkpoints at); SIGINT is
forwarded to it as SIGTERM.
"""
import os
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

# EX_TEMPFAIL: preempted with the state saved; rerunning the same command resumes.
EXIT_CODE = 75


class Preempted(Exception):
  """Raised by the loop after it saved a stage's state on SIGTERM / SIGINT."""

  def __init__(self, stage: str, step: int):
    super().__init__(f'{stage}: stopped by a signal, checkpoint saved at step {step}; '
                     'rerun the same command to resume')
    self.stage, self.step = stage, step


class Watcher:
  """Installs the handlers for one stage (``with``); the previous ones come back after."""

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning('training outside the main thread: signals will not save a checkpoint')
      return self
    handlers = ({signal.SIGINT: self._forward} if self._multi else
                {signal.SIGTERM: self._flag, signal.SIGINT: self._flag})
    for sig, handler in handlers.items():
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc_info):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    """Called after every step, by every process, with the same step."""
    if self._multi and not self.requested:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError as e:  # the preemption service is disabled
        logging.warning('no preemption checkpoints across processes: %s', e)
        self._multi = False
    return self.requested

  def _flag(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    logging.warning('%s: saving a checkpoint after the current step, then exiting',
                    signal.Signals(signum).name)
    self.requested = True

  def _forward(self, signum, frame):
    del signum, frame
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier listens to SIGTERM
