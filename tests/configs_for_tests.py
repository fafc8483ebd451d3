"""Loads the repo's config files the way main.py does."""
import importlib.util
import pathlib

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
