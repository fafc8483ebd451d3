"""What happens to bad examples: an error naming them, or (``data.skip_bad``) skipped and counted.

Readers report per-example problems (a missing or undecodable image, an unusable
label) through ``screen``. By default that raises a DataError naming the file,
line or column; inside ``policy(skip=True)`` (``faceflax.app.run`` with
``config.data.skip_bad=True``) the bad examples are left out, logged, and counted
in ``summary()``, which the tasks write into ``results.json``. Problems that are
not about one example (a missing column, a path escaping the dataset folder) are
always errors.
"""
import contextlib
import dataclasses

import numpy as np
from absl import logging

from faceflax.data.errors import DataError

MAX_LISTED = 5       # Offending examples named in one message.
_MAX_RECORDED = 20   # Skipped examples named in results.json.


@dataclasses.dataclass
class _Policy:
  skip: bool = False
  skipped: dict = dataclasses.field(default_factory=dict)  # example -> why, first seen first
  warnings: dict = dataclasses.field(default_factory=dict)  # (kind, where) -> (count, example)
  in_run: bool = True  # inside ``policy()`` (a run): warnings are kept for its results.json


_policy = _Policy(in_run=False)  # outside a run: warnings are only logged


@contextlib.contextmanager
def policy(skip: bool):
  """Bad examples inside the block are skipped (skip=True) or raise (skip=False)."""
  global _policy
  previous, _policy = _policy, _Policy(bool(skip))
  try:
    yield _policy
  finally:
    _policy = previous


def describe(items, whys) -> str:
  return '; '.join(f'{item}: {why}' if why else str(item)
                   for item, why in list(zip(items, whys))[:MAX_LISTED])


def screen(where: str, kind: str, items, whys, *, skippable: bool = True) -> np.ndarray:
  """Keep-mask over ``items``; ``whys[i]`` is None for a good item, else what is wrong.

  Bad items raise a DataError ('<where>: <n> <kind>: <item>: <why>; ...') unless
  skipping is on and ``skippable``; then they are logged and recorded. Skipping
  every item is still an error: nothing would be left to train or score on.
  """
  whys = list(whys)
  bad = [i for i, why in enumerate(whys) if why is not None]
  keep = np.ones(len(whys), bool)
  if not bad:
    return keep
  message = f'{where}: {len(bad)} {kind}: ' + describe(
      [items[i] for i in bad], [whys[i] for i in bad])
  if not (_policy.skip and skippable):
    hint = ' (--config.data.skip_bad=True leaves such examples out)' if skippable else ''
    raise DataError(message + hint)
  if len(bad) == len(whys):
    raise DataError(f'{message}; every example is bad, none left')
  logging.warning('skipping bad examples (data.skip_bad): %s', message)
  for i in bad:
    _policy.skipped.setdefault(str(items[i]), f'{kind}: {whys[i]}' if whys[i] else kind)
  keep[bad] = False
  return keep


def warn(kind: str, where: str, count: int, example: str) -> None:
  """A problem with the data that training can live with but a user should know about
  (duplicates, leakage between splits): logged once per (kind, where), and in results.json."""
  if (kind, str(where)) not in _policy.warnings:
    logging.warning('%s: %d %s, e.g. %s', where, count, kind, example)
  if _policy.in_run:
    _policy.warnings[(kind, str(where))] = (int(count), example)


def summary() -> dict:
  """For results.json: ``data_skipped`` when skipping is on, ``data_warnings`` when any."""
  out = {}
  if _policy.warnings:
    out['data_warnings'] = [{'kind': kind, 'where': where, 'count': count, 'example': example}
                            for (kind, where), (count, example) in _policy.warnings.items()]
  if not _policy.skip:
    return out
  skipped = list(_policy.skipped.items())
  return {**out, 'data_skipped': {
      'count': len(skipped),
      'examples': [f'{item}: {why}' for item, why in skipped[:_MAX_RECORDED]]}}
