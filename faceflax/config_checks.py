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
  if model.width % 4 or model.width % model.num_heads:
    raise ValueError(f'{key}: width {model.width} must be divisible by 4 (position embedding) '
                     f'and by num_heads {model.num_heads}')
