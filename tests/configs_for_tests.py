"""Loads the repo's config files the way main.py does."""
import importlib.util
import pathlib

from absl import flags
from ml_collections import config_flags

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def load(name: str, preset: str = ''):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def fbp(preset: str = 'test'):
  config = load('fbp_kd', preset)
  config.teacher.finetune.from_pretrained = False
  return config


def parse_flags(name: str, *overrides, preset: str = 'test'):
  """The config of ``main.py --config=configs/<name>.py:<preset> <overrides>``."""
  argv = ['prog', f'--config={CONFIGS}/{name}.py:{preset}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'c', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config
