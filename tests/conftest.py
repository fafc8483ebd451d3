"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared paths.

The many tiny jobs of the suite compile the same XLA programs again and again (every
job builds new jitted closures; the subprocesses start cold): a persistent compilation
cache in a fresh folder for this session, inherited by the subprocesses through the
environment, compiles each program once. Set JAX_COMPILATION_CACHE_DIR to choose the
folder (it is then kept), or to '' to compile everything.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='faceflax-test-jax-cache-')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
# Cache every program, however fast its compilation or small its executable.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import pytest  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


def shared_dataset(name: str) -> pathlib.Path:
  path = SHARED_DATA / name
  if not (path / 'labels.csv').exists():
    pytest.skip(f'real data {path} is not available')
  return path
