"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared paths."""
import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


def shared_dataset(name: str) -> pathlib.Path:
  path = SHARED_DATA / name
  if not (path / 'labels.csv').exists():
    pytest.skip(f'real data {path} is not available')
  return path
