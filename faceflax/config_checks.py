"""Config checks run by ``app.run`` before any data is read or any step is compiled.

ml_collections already refuses unknown keys and values of the wrong type (the
config is locked and type-safe, on the command line and in code). These checks
catch values that are well-typed but unusable (a batch size of 0, a negative
learning rate) or inconsistent (an image size the patch size does not divide,
a student wider than its teacher): ``check_common`` for every task, then the
task's own ``check_config``, each naming the offending keys.
"""
import math

from ml_collections import ConfigDict

from faceflax.models import mae
from faceflax.train import loop, precision


class ConfigError(ValueError):
  """A config value or flag that cannot work; the message names the key or flag."""


def _positive_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Leaf name -> (test, what it must be). Applied to every key of that name at any depth.
RULES = {
    **{k: (_positive_int, 'an integer >= 1') for k in (
        'batch_size', 'eval_batch_size', 'steps', 'image_size', 'patch', 'size', 'log_every',
        'checkpoint_every', 'keep_checkpoints', 'image_every', 'grad_accum_steps',
        'stem_stride', 'num_bins')},
    **{k: (_non_negative_int, 'an integer >= 0') for k in (
        'unlabeled_batch_size', 'warmup_steps', 'max_train', 'max_val')},
    'lr': (lambda v: _number(v) and v > 0, 'a finite number > 0'),
    'weight_decay': (lambda v: _number(v) and v >= 0, 'a finite number >= 0'),
    'grad_clip': (lambda v: _number(v) and v > 0, 'a finite number > 0'),
    'layer_decay': (lambda v: _number(v) and 0 < v <= 1, 'in (0, 1]'),
    'mask_ratio': (lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    'dropout': (lambda v: _number(v) and 0 <= v < 1, 'in [0, 1)'),
    'temperature': (lambda v: _number(v) and v > 0, 'a finite number > 0'),
    **{k: (lambda v: _number(v) and v >= 0, 'a finite number >= 0') for k in (
        'alpha', 'beta', 'ld_weight', 'l1_weight', 'gender_weight', 'race_weight',
        'pixel_weight', 'patch_weight', 'component_weight')},
}


def _leaves(config, prefix=''):
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ConfigDict):
      yield from _leaves(value, path + '.')
    else:
      yield path, key, value


def check_common(config) -> None:
  """Rules by key name (``RULES``) and the shared train / data switches; ValueError naming keys."""
  bad = [f'{path}={value!r} (must be {what})' for path, key, value in _leaves(config)
         if key in RULES and not RULES[key][0](value)
         for what in [RULES[key][1]]]
  if bad:
    raise ValueError('config: ' + '; '.join(bad))
  train = config.get('train', {})
  if train.get('seed', config.get('seed')) != config.get('seed'):
    raise ValueError(f'config.train.seed={train.seed} differs from config.seed={config.seed}: '
                     'one seed drives init, data order and augmentation; set --config.seed '
                     '(train.seed follows it)')
  if train.get('on_nonfinite', 'stop') not in loop.ON_NONFINITE:
    raise ValueError(f'config.train.on_nonfinite={train.get("on_nonfinite")!r}: expected one '
                     f'of {loop.ON_NONFINITE}')
  precision.compute_dtype(train)  # names the key when unknown
  skip = config.get('data', {}).get('skip_bad', False)
  if not isinstance(skip, bool):
    raise ValueError(f'config.data.skip_bad={skip!r}: expected True or False')
  if 'data' in config and 'input' in config.data:
    from faceflax.data import pipeline  # pylint: disable=g-import-not-at-top  # imports TF
    pipeline.options(config)  # names data.input / data.cache_max_gb when unusable


def check_mae(model: mae.MAE, key: str) -> None:
  """An MAE ViT's sizes fit together (checked here, before its setup runs at compile time)."""
  if model.image_size % model.patch:
    raise ValueError(f'{key}: image size {model.image_size} is not divisible by patch '
                     f'{model.patch}')
  if model.stem == 'multiscale' and model.patch % model.stem_stride:
    raise ValueError(f'{key}: patch {model.patch} is not divisible by stem_stride '
                     f'{model.stem_stride}')
  if model.stem not in ('patch', 'multiscale'):
    raise ValueError(f"{key}.stem={model.stem!r}: expected 'patch' or 'multiscale'")
  if model.attention not in mae.ATTENTION:
    raise ValueError(f'{key}.attention={model.attention!r}: expected one of {sorted(mae.ATTENTION)}')
  if model.remat not in mae.REMAT:
    raise ValueError(f'{key}.remat={model.remat!r}: expected one of {sorted(mae.REMAT)}')
  if model.width % 4 or model.width % model.num_heads:
    raise ValueError(f'{key}: width {model.width} must be divisible by 4 (position embedding) '
                     f'and by num_heads {model.num_heads}')


def load_config_file(spec: str) -> ConfigDict:
  """The config of ``--config=path[:preset]``, loaded as ml_collections' config flag does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, preset = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('faceflax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _key_paths(config, prefix=''):
  for key, value in config.items():
    yield f'{prefix}{key}'
    if isinstance(value, ConfigDict):
      yield from _key_paths(value, f'{prefix}{key}.')


def unknown_override(config_spec: str, argv) -> str:
  """The message for the first ``--config.a.b=v`` of ``argv`` that names a key the config
  file lacks ('' when every override names a key): the flag, the unknown part, and the
  closest valid keys."""
  import difflib  # pylint: disable=g-import-not-at-top
  config = load_config_file(config_spec)
  paths = list(_key_paths(config))
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0]
    node, walked = config, []
    for part in path.split('.'):
      if not isinstance(node, ConfigDict) or part not in node:
        where = '.'.join(walked) or 'the top level'
        close = difflib.get_close_matches(path, paths, n=4, cutoff=0.5) or sorted(
            p for p in paths if p.count('.') == len(walked) and p.startswith('.'.join(walked)))[:8]
        return (f'{arg}: {config_spec} has no key {path!r} ({part!r} is not a key of {where}; '
                f'task {config.get("task", "?")!r}). Closest valid keys: {", ".join(close)}')
      node = node[part]
      walked.append(part)
  return ''
