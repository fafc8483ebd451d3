"""Entry point shared by ``main.py`` and the tests: config -> the task's mode."""
import glob
import json
import logging as logging_std
import os

import jax
from absl import logging

from faceflax import config_checks, tasks
from faceflax.data import bad_data
from faceflax.train import files

MODES = ('train', 'eval', 'predict', 'verify')
ENTRY = {'predict': 'run_predict', 'verify': 'run_verify'}  # the Job method of each mode


class _QuietLibraries(logging_std.Filter):
  """Drops Orbax's per-save INFO chatter so the training log stays readable."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs():
  logging.get_absl_handler().addFilter(_QuietLibraries())


CACHE_ENV = 'FACEFLAX_COMPILATION_CACHE'


def use_compilation_cache() -> str:
  """JAX's persistent compilation cache, so a rerun, a resumed stage, --mode=eval or the next
  seed of a sweep loads its compiled steps instead of compiling them again. Its folder:
  ``$FACEFLAX_COMPILATION_CACHE`` (``off`` disables it), else ``$JAX_COMPILATION_CACHE_DIR``,
  else ``~/.cache/faceflax/xla``. The cache key covers the program, the XLA flags, the devices
  and the jax version, so a changed model or machine compiles anew."""
  path = os.environ.get(CACHE_ENV) or os.environ.get('JAX_COMPILATION_CACHE_DIR') or \
      os.path.join(os.path.expanduser('~'), '.cache', 'faceflax', 'xla')
  if path == 'off':
    return ''
  jax.config.update('jax_compilation_cache_dir', path)
  return path


def with_tfds_data(config):
  """``config`` reading ``data.tfds`` (README "Data at scale"): ``data.dir`` becomes the
  dataset's record index (written by process 0 on first use), which every task reads."""
  name = config.data.get('tfds', '')
  if not name:
    return config
  from faceflax.data import records  # pylint: disable=g-import-not-at-top
  if 'dir' not in config.data:
    raise ValueError(f'config.data.tfds={name!r}: task {config.task!r} has no data.dir; '
                     f'name TFDS datasets as {records.TFDS_PREFIX}NAME in its dataset '
                     'entries instead (README "Data at scale")')
  if config.data.get('dir'):  # e.g. a preset's development folder
    logging.warning('data.tfds=%s replaces data.dir=%s', name, config.data.dir)
  store = records.shared_tfds_store(name, config.data.get('tfds_data_dir', ''))
  config = config.copy_and_resolve_references()
  config.data.dir = store
  logging.info('data.tfds=%s: reading %s', name, store)
  return config


def expected_errors() -> tuple:
  """Errors that say what is wrong with the user's input (data, config, workdir, checkpoint):
  main.py prints their message in one line, without a traceback (README "Failure behaviour")."""
  from faceflax.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from faceflax.train import checkpoint, stages, state  # pylint: disable=g-import-not-at-top
  return (DataError, config_checks.ConfigError, files.WorkdirError, checkpoint.CheckpointError,
          stages.ConfigChanged, state.PretrainedMismatch)


def run(config, workdir: str, mode: str = 'train', input_path: str = '', output: str = '',
        align: str = 'auto', allow_config_change: bool = False):
  """``input_path``, ``output``, ``align``: --mode=predict / verify (README "Use a trained model");
  ``allow_config_change``: train on in a workdir trained with another config, or score with
  other preprocessing than the models were trained with (``stages``)."""
  from faceflax.data import ops  # pylint: disable=g-import-not-at-top  # TensorFlow
  ops.keep_tensorflow_off_accelerators()  # before anything TensorFlow runs
  use_compilation_cache()
  try:
    job = _check_before_work(config, workdir, mode, input_path, output)
  except ValueError as e:  # the checks' ValueErrors are about the config or the flags
    if isinstance(e, expected_errors()):
      raise
    raise config_checks.ConfigError(str(e)) from e
  files.check_writable(os.path.abspath(workdir))
  logging.info('task=%s mode=%s workdir=%s devices=%d (%s) processes=%d', config.task, mode,
               workdir, jax.device_count(), jax.devices()[0].platform, jax.process_count())
  logging.info('config:\n%s', config)
  from faceflax.train import stages  # pylint: disable=g-import-not-at-top
  with bad_data.policy(skip=config.data.get('skip_bad', False)):
    config = with_tfds_data(config)
    if mode != 'train':
      stages.check_preprocessing_unchanged(config, workdir, allow_config_change)
    if mode == 'train':
      stages.check_config_unchanged(config, workdir, allow_config_change)
      job.check_data(config, workdir)  # every split read now: bad data fails before training
      stages.record_config(config, workdir)  # the config of what trains here, once it can
      return job.train_and_evaluate(config, workdir)
    if mode == 'predict':
      return job.run_predict(config, workdir, input_path, output, align)
    if mode == 'verify':
      return job.run_verify(config, workdir, input_path, align)
    return job.run_eval(config, workdir)


def _check_before_work(config, workdir, mode, input_path, output):
  """Every check that needs no data, first: a bad config or flag fails in seconds. The task's
  Job class."""
  if mode not in MODES:
    raise ValueError(f'--mode={mode!r}: expected one of {MODES}')
  if not workdir:
    raise ValueError('--workdir is required')
  job = tasks.get(config.task).Job
  other = trained_by(workdir) if mode != 'train' else None
  if other and other != config.task:
    raise ValueError(f'--workdir {workdir} holds a {other} run, but --config is for task '
                     f'{config.task!r}: use configs/{other}.py (with the preset it was trained '
                     'with) for this workdir')
  if mode in ('predict', 'verify'):
    if not hasattr(job, ENTRY[mode]):
      raise ValueError(f'--mode={mode} is not available for task {config.task!r}'
                       + (' (verify is for lqfr_kd)' if mode == 'verify' else ''))
    if jax.process_count() > 1:
      raise ValueError(f'--mode={mode} runs in one process (--distributed=off)')
    from faceflax import predict  # pylint: disable=g-import-not-at-top
    predict.check_inputs(mode, input_path, output)  # a missing input fails before any model loads
  quiet_library_logs()
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # process 0 writes the log; the others only problems
  config_checks.check_common(config)
  job.check_config(config)
  return job


def trained_by(workdir: str) -> str | None:
  """The task whose run ``workdir`` holds: its recorded config.json, else (runs from before
  it was recorded) the task whose stage folders are there; None for an empty workdir."""
  path = os.path.join(workdir, 'config.json')
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f).get('task')
  for name in tasks.names():
    stages = tasks.get(name).Job.STAGES
    if any(os.path.isdir(os.path.join(workdir, s, 'ckpt')) for s in stages):
      return name
  if glob.glob(os.path.join(workdir, 'finetune_*', 'ckpt')):
    return 'transfer'
  return None
