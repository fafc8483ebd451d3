"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared paths.

The many tiny jobs of the suite compile the same XLA programs again and again (every
job builds new jitted closures; the subprocesses start cold): a persistent compilation
cache in a fresh folder for this session, inherited by the subprocesses through the
environment, compiles each program once. Set JAX_COMPILATION_CACHE_DIR to choose the
folder (it is then kept), or to '' to compile everything.
"""
import atexit
import fcntl
import os
import pathlib
import pickle
import shutil
import tempfile

from faceflax import xla_setup

# Tests never time XLA's code, but they compile hundreds of small programs: LLVM at -O1
# without its expensive passes compiles them ~20% faster. (-O0 is faster still but gave
# NaN gradients through the CBAM max-pools.) Subprocesses get these through xla_flags().
FAST_COMPILE = '--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true'


def xla_flags(devices: int) -> str:
  # faceflax's CPU flags too (what main.py sets): the suite checks the numerics under them.
  return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE} {xla_setup.CPU_FLAGS}'


os.environ.setdefault('XLA_FLAGS', xla_flags(8))
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


# Jobs that several tests only read: trained once per session, by whichever xdist worker
# asks first. A test that changes a workdir (--mode=eval writes files, a rerun adds
# stages) works on its own copy.

def copy_workdir(trained: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  shutil.copytree(trained, dest, dirs_exist_ok=True)
  return dest


def built_once(tmp_path_factory, name: str, build):
  """``(path, build(path))`` for a fresh folder ``path``, built once per test session.

  Each xdist worker has its own session fixtures; the folder above the workers' temp
  folders is shared, so a file lock there lets the first worker build and the others
  wait and reuse what it built (``build``'s result is pickled beside the folder).
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  path, result = root / name, root / f'{name}.pkl'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not result.exists():
      shutil.rmtree(path, ignore_errors=True)  # what a failed attempt left
      path.mkdir()
      result.write_bytes(pickle.dumps(build(path)))
    return path, pickle.loads(result.read_bytes())


def _train_once(tmp_path_factory, name, config):
  """(workdir, results) of ``app.run(config, workdir)``, once per session."""
  from faceflax import app  # pylint: disable=g-import-not-at-top
  return built_once(tmp_path_factory, name, lambda workdir: app.run(config, str(workdir)))


@pytest.fixture(scope='session')
def age_faces(tmp_path_factory):
  from tests import test_age  # pylint: disable=g-import-not-at-top
  return built_once(tmp_path_factory, 'age_faces', test_age.write_faces)[1]


@pytest.fixture(scope='session')
def age_job(age_faces, tmp_path_factory):
  """The age job of test_age._config(age_faces)."""
  from tests import test_age  # pylint: disable=g-import-not-at-top
  return _train_once(tmp_path_factory, 'age_job', test_age._config(age_faces))  # pylint: disable=protected-access


@pytest.fixture(scope='session')
def transfer_data_root(tmp_path_factory):
  from tests import test_transfer  # pylint: disable=g-import-not-at-top
  return built_once(tmp_path_factory, 'transfer_data', test_transfer.write_data_root)[0]


@pytest.fixture(scope='session')
def transfer_job(transfer_data_root, fbp_job, tmp_path_factory):
  """The transfer job of test_transfer.job_config(transfer_data_root, fbp_job[0])."""
  from tests import test_transfer  # pylint: disable=g-import-not-at-top
  return _train_once(tmp_path_factory, 'transfer_job',
                     test_transfer.job_config(transfer_data_root, fbp_job[0]))


@pytest.fixture(scope='session')
def fbp_job(tmp_path_factory):
  """The whole fbp_kd job of configs/fbp_kd.py:test (every stage, on drawn faces)."""
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  return _train_once(tmp_path_factory, 'fbp_job', configs_for_tests.load('fbp_kd', 'test'))


@pytest.fixture(scope='session')
def lqfr_job(tmp_path_factory):
  """The lqfr_kd job of configs/lqfr_kd.py:test (teacher, student_both, evaluate)."""
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  return _train_once(tmp_path_factory, 'lqfr_job', configs_for_tests.load('lqfr_kd', 'test'))


@pytest.fixture(scope='session')
def face_prior_job(tmp_path_factory):
  """(workdir, config): the face_prior :test job on one plain folder of drawn faces."""
  from faceflax import app  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests, predict_helpers  # pylint: disable=g-import-not-at-top

  def build(root):
    predict_helpers.folder_dataset(root / 'data' / 'plain', (), lambda i, t: ())
    config = configs_for_tests.load('face_prior', 'test')
    config.data.root, config.data.datasets = str(root / 'data'), 'plain'
    app.run(config, str(root / 'work'))
    return root / 'work', config
  return built_once(tmp_path_factory, 'face_prior_job', build)[1]


@pytest.fixture(scope='session')
def photos(tmp_path_factory):
  """Photos to predict on: see ``predict_helpers.write_photos``."""
  from tests import predict_helpers  # pylint: disable=g-import-not-at-top
  return predict_helpers.write_photos(tmp_path_factory.mktemp('photos'))
