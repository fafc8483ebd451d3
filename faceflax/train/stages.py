"""Stage bookkeeping shared by the tasks: which stages to run and where finished ones live."""
import fnmatch
import json
import os
import shutil
import time

import jax
from absl import logging

from faceflax.data import bad_data
from faceflax.train import checkpoint, files, loop, mesh as mesh_lib


def parse(value: str, known, key: str = 'stages', required: bool = False) -> list[str]:
  """A config's comma-separated names ('a,b' -> ['a', 'b'], each once), refusing names not in
  ``known`` and, when ``required``, none at all; the error names ``key`` and the culprits."""
  names = list(dict.fromkeys(n.strip() for n in str(value).split(',') if n.strip()))
  unknown = [n for n in names if n not in known]
  if unknown or (required and not names):
    raise ValueError(f'config.{key}={value!r}: unknown or no names {unknown}; known: '
                     f'{", ".join(known)}')
  return names


def stage_dir(workdir: str, reuse_from: str, name: str) -> str:
  """Where a finished stage is read from: this workdir, else ``reuse_from``."""
  if loop.is_done(workdir, name) or not reuse_from:
    return os.path.join(workdir, name)
  if loop.is_done(reuse_from, name):
    logging.info('%s: reusing the finished stage in %s', name, reuse_from)
  return os.path.join(reuse_from, name)


def finished(workdir: str, reuse_from: str, name: str) -> bool:
  """Whether stage ``name`` finished training, here or in ``reuse_from``."""
  return loop.is_done(os.path.dirname(stage_dir(workdir, reuse_from, name)), name)


def load_state(workdir: str, reuse_from: str, name: str, init_state_fn, mesh,
               restored: dict | None = None) -> dict:
  """The final train state of a finished stage, replicated over the mesh; ``restored``
  gets {name: {'checkpoint': its folder, 'step': the step restored}}."""
  abstract_state = checkpoint.abstract(jax.eval_shape(init_state_fn, jax.random.key(0)),
                                       mesh_lib.replicated(mesh))
  directory = os.path.join(stage_dir(workdir, reuse_from, name), 'ckpt')
  step, state = checkpoint.load_params(directory, abstract_state, name)
  if restored is not None:
    restored[name] = {'checkpoint': directory, 'step': int(step)}
  return state


def _done_facts(workdir: str, reuse_from: str, names, key: str) -> dict:
  """``key`` of each finished stage's done marker, where it has one."""
  out = {}
  for name in names:
    if finished(workdir, reuse_from, name):
      d = os.path.dirname(stage_dir(workdir, reuse_from, name))
      with open(loop.done_marker(d, name)) as f:
        facts = json.load(f)
      if key in facts:
        out[name] = facts[key]
  return out


def seconds(workdir: str, reuse_from: str, names) -> dict:
  """Training seconds of each finished stage (from its done marker)."""
  return _done_facts(workdir, reuse_from, names, 'seconds')


def loaded(workdir: str, reuse_from: str, names) -> dict:
  """What each finished stage loaded at init (pretrained weights, from where; ``Stage.loaded``)."""
  return _done_facts(workdir, reuse_from, names, 'loaded')


def write_json(path: str, results: dict) -> None:
  """Writes from process 0 only, atomically (a crash never leaves half a file)."""
  if jax.process_index() != 0:
    return
  files.write_json(path, results)
  logging.info('wrote %s', path)


MODEL_FACTS = 'model_facts.json'


def model_facts(workdir: str) -> dict:
  """What the workdir's models took from their training data (``record_facts``); {} if nothing.

  Restoring and predicting read these instead of the data, so a trained workdir is
  enough to score new photos; workdirs from before they were recorded fall back to the data.
  """
  path = os.path.join(workdir, MODEL_FACTS)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def record_facts(workdir: str, **facts) -> None:
  """Merges ``facts`` (JSON values) into ``<workdir>/model_facts.json``, from process 0."""
  old = model_facts(workdir)
  new = {**old, **json.loads(json.dumps(facts))}  # as read back: tuples become lists
  if new != old:
    write_json(os.path.join(workdir, MODEL_FACTS), new)


def write_results(path: str, results: dict) -> None:
  """``write_json`` of a run's results, with the count of bad examples skipped (data.skip_bad)."""
  write_json(path, {**results, **bad_data.summary()})


def trained_but_unreadable(error, workdir: str, reuse_from: str, name: str, partial: bool) -> None:
  """Re-raises ``error`` (a stage's checkpoint could not be restored) when the stage finished
  training, so its model exists but cannot be read, unless ``partial`` (``eval.partial``:
  score the models that load); a stage that never trained is only skipped."""
  if finished(workdir, reuse_from, name) and not partial:
    raise checkpoint.CheckpointError(
        f'{error} (stage {name} finished training but its checkpoints cannot be read; '
        '--config.eval.partial=True scores the models that load)') from error
  logging.warning('not scoring %s: %s', name, error)


CONFIG_FILE = 'config.json'
# Config keys whose change leaves the trained models and their scores as they are (logging,
# checkpoint cadence, how input is fed, the device mesh, which stages to run or reuse).
NEUTRAL_KEYS = ('stages', 'reuse_from', 'eval_batch_size', 'train.log_every',
                'train.checkpoint_every', 'train.keep_checkpoints', 'train.image_every',
                'data.input', 'data.cache_max_gb', 'data.tfds_data_dir', 'mesh.*')


# Keys added after workdirs were trained, with the value that reproduces how those trained:
# a config.json without such a key recorded that value.
ADDED_KEYS = {'*.mixup': 0.0, '*.ema_decay': 0.0, '*.remat': 'none', '*.relational': 0.0,
              '*.init_from': ''}


def _recorded_value(recorded: dict, key: str):
  if key in recorded:
    return recorded[key]
  return next((v for p, v in ADDED_KEYS.items() if fnmatch.fnmatchcase(key, p)), '<absent>')


class ConfigChanged(ValueError):
  """A finished workdir rerun with a config that would change its models or scores."""


def _flat_config(config) -> dict:
  values = json.loads(json.dumps(config.to_dict(), default=str))  # as read back from JSON
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        flat[f'{prefix}{key}'] = value
  walk(values, '')
  return flat


def config_changes(recorded: dict, config) -> list[str]:
  """'key: recorded -> now' of every key (but the neutral ones) whose value differs."""
  now = _flat_config(config)
  changed = []
  for key in sorted(set(recorded) | set(now)):
    if any(fnmatch.fnmatchcase(key, p) for p in NEUTRAL_KEYS):
      continue
    before, after = _recorded_value(recorded, key), now.get(key, '<absent>')
    if before != after:
      changed.append(f'{key}: {before!r} -> {after!r}')
  return changed


def check_config_unchanged(config, workdir: str, allow_change: bool = False) -> None:
  """Against the config a workdir trained with (``config.json``): a rerun whose config differs
  in a key that changes the models or their scores is refused, listing the keys, unless
  ``allow_change`` (``--allow_config_change``): then the earlier results.json and
  model_facts.json are kept beside the new ones (``*.before-<time>.json``)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      changed = config_changes(json.load(f), config)
    if changed and not allow_change:
      raise ConfigChanged(
          f'{workdir} was trained with another config ({path}); {len(changed)} key(s) differ: '
          + '; '.join(changed) + '. Use another --workdir, or pass --allow_config_change to '
          'continue in this one (the earlier results are kept as *.before-<time>.json).')
    if changed and jax.process_index() == 0:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for name in ('results.json', MODEL_FACTS, CONFIG_FILE):
        old = os.path.join(workdir, name)
        if os.path.exists(old):
          shutil.copy2(old, os.path.join(workdir, f'{name[:-5]}.before-{stamp}.json'))
      logging.warning('%s: config changed (--allow_config_change): %s', workdir,
                      '; '.join(changed))


# What the models' inputs are made of: scoring with other values scores other inputs.
PREPROCESSING_KEYS = ('data.image_size', 'data.eval_pp', 'backbone.image_size')


def check_preprocessing_unchanged(config, workdir: str, allow_change: bool = False) -> None:
  """--mode=eval / predict / verify: the preprocessing keys must be those the workdir's models
  were trained with (its config.json), unless ``allow_change`` (``--allow_config_change``)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return  # a workdir from before configs were recorded
  with open(path) as f:
    recorded = json.load(f)
  now = _flat_config(config)
  changed = [f'{k}: trained with {recorded[k]!r}, now {now.get(k)!r}' for k in PREPROCESSING_KEYS
             if k in recorded and recorded[k] != now.get(k)]
  if changed and not allow_change:
    raise ConfigChanged(f'{workdir}: the models were trained on other inputs ({path}): '
                        + '; '.join(changed) + '. Score with the training values (drop the '
                        'override), or pass --allow_config_change to score anyway.')
  if changed:
    logging.warning('%s: scoring with other preprocessing (--allow_config_change): %s',
                    workdir, '; '.join(changed))


def record_config(config, workdir: str) -> None:
  """Writes the config a workdir trains with (once its data has been checked)."""
  write_json(os.path.join(workdir, CONFIG_FILE), _flat_config(config))
