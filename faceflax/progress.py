"""Progress lines for long loops (screening, evaluation, prediction, training): count, rate, ETA."""
import itertools
import math
import threading
import time

from absl import logging

EVERY_SECONDS = 10.0


def eta_seconds(done: float, total: float, elapsed: float) -> float:
  """Time left at the rate so far (``done`` of ``total`` in ``elapsed`` seconds); inf at 0 done."""
  return (total - done) * elapsed / done if done > 0 else math.inf


def duration(seconds: float) -> str:
  """'1h02m03s', '4m05s', '6s'; '?' when unknown."""
  if not math.isfinite(seconds):
    return '?'
  m, s = divmod(int(round(max(seconds, 0))), 60)
  h, m = divmod(m, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s' if m else f'{s}s'


class Progress:
  """Logs ``what: done/total (pct), rate/s, ETA`` every ``every`` seconds and at the end.

  ``update`` may be called from several threads (tf.data's parallel map).

  A loop that ends within ``every`` seconds of its start logs nothing (``quiet_if_short``),
  so that small loops (a probe batch, a tiny test dataset) do not fill the log.
  """

  def __init__(self, what: str, total: int, *, every: float | None = None,
               quiet_if_short: bool = False, clock=time.perf_counter):
    self.what, self.total, self.clock = what, total, clock
    self.every = EVERY_SECONDS if every is None else every
    self.quiet_if_short = quiet_if_short
    self.start = self.last = clock()
    self.lock = threading.Lock()

  def update(self, done: int) -> str | None:
    """Call after each item or batch; returns the line it logged, if any."""
    with self.lock:
      return self._update(done)

  def _update(self, done: int) -> str | None:
    now = self.clock()
    if done < self.total:
      if now - self.last < self.every:
        return None
    elif self.quiet_if_short and now - self.start < self.every:
      return None
    self.last = now
    elapsed = max(now - self.start, 1e-9)
    line = (f'{self.what}: {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), '
            f'{done / elapsed:.1f}/s, ETA {duration(eta_seconds(done, self.total, elapsed))}')
    logging.info('%s', line)
    return line


def logged(items, what: str, total: int, per_item: int = 1, **kwargs):
  """Yields ``items`` (e.g. batches of ``per_item`` examples) with ``Progress(**kwargs)`` lines.

  Quiet if the loop is short.
  """
  progress = Progress(what, total, quiet_if_short=True, **kwargs)
  for i, item in enumerate(items):
    yield item
    progress.update(min((i + 1) * per_item, total))


def counter(what: str, total: int):
  """A function counting its calls (from any thread), with quiet-if-short ``Progress`` lines."""
  progress, calls = Progress(what, total, quiet_if_short=True), itertools.count(1)

  def tick() -> int:
    done = next(calls)  # atomic under the GIL
    progress.update(done)
    return done
  return tick
