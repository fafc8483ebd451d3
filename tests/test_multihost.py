"""Two processes on localhost (CPU, gloo) = one process over the same global batch.

Each process of ``main.py`` has 4 simulated devices (8 in all, as in this test
process), streams its half of every batch from a record store (README "Data at
scale") and reads its half of the evaluation set, and both write one Orbax
checkpoint that this single process then restores. That each process reads its
own records and together every record once per epoch is checked record by record
in ``test_records.test_processes_read_disjoint_records_covering_the_epoch``; here
the losses and scores of the two processes equal the one process's.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import pytest

from faceflax import app
from faceflax.data import records, synthetic
from faceflax.tasks import fbp_kd
from tests import configs_for_tests
from tests.conftest import REPO, xla_flags

OVERRIDES = {'stages': 'teacher_finetune,student_kd,evaluate',
             'teacher.finetune.from_pretrained': False, 'student.kd.from_pretrained': False,
             'train.checkpoint_every': 4, 'data.input': 'stream'}
NUM_VAL = 37  # in batches of 16: the last batch has 5 rows, all on process 0.


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  """The test preset's drawn faces (37 val) as a record store."""
  s = configs_for_tests.load('fbp_kd', 'test').data.synthetic
  root = tmp_path_factory.mktemp('faces')
  faces = synthetic.write_folder_dataset(root / 'folder', num_train=s.num_train,
                                         num_val=NUM_VAL, size=s.size, seed=s.seed)
  return records.prepare_folder(faces, root / 'store')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_process_run(workdir, log_dir, data_dir):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  procs, logs = [], []
  for i in range(2):
    logs.append(open(log_dir / f'process{i}.log', 'w'))
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / 'main.py'), f'--config={REPO}/configs/fbp_kd.py:test',
         f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in OVERRIDES.items()),
         f'--config.data.dir={data_dir}', '--config.data.eval_split=val',
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
        env=env, cwd=REPO, stdout=logs[-1], stderr=subprocess.STDOUT))
  for p, f in zip(procs, logs):
    try:
      p.wait(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
      f.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, (log_dir / f'process{i}.log').read_text()[-4000:]
  return (log_dir / 'process0.log').read_text()


def _config(data_dir):
  config = configs_for_tests.load('fbp_kd', 'test')
  config.data.dir, config.data.eval_split = str(data_dir), 'val'
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _losses(workdir, stage):
  return [json.loads(line)['loss'] for line in (workdir / stage / 'metrics.jsonl').open()]


def test_two_processes_equal_one_and_their_checkpoint_restores_in_one(tmp_path, store):
  t0 = time.perf_counter()
  log = _two_process_run(tmp_path / 'two', tmp_path, store)
  seconds = time.perf_counter() - t0
  assert 'process 0 of 2, 4 local / 8 global devices' in log

  config = _config(store)
  assert jax.device_count() == 8 and jax.process_count() == 1
  one = app.run(config, str(tmp_path / 'one'))
  two = json.loads((tmp_path / 'two' / 'results.json').read_text())
  for stage in ('teacher_finetune', 'student_kd'):  # the same batches, step for step
    ones, twos = _losses(tmp_path / 'one', stage), _losses(tmp_path / 'two', stage)
    assert len(ones) == len(twos) == 2  # steps 2 and 4 (train.log_every=2)
    np.testing.assert_allclose(twos, ones, rtol=1e-4)
  for who in ('teacher', 'student'):
    assert two[who]['n'] == one[who]['n'] == NUM_VAL  # every val face exactly once
    # Gloo's all-reduce sums the gradients in another order than one process does: the
    # parameters differ by up to ~1e-4 (checked below), the scores by as much.
    for k in ('pc', 'mae', 'rmse'):
      np.testing.assert_allclose(two[who][k], one[who][k], rtol=1e-3, atol=1e-4)

  # The 2-process checkpoints, restored here by one process, equal the 1-process run's.
  diffs = []
  for stage in ('teacher_finetune', 'student_kd'):
    restored = fbp_kd.Job(config, str(tmp_path / 'two')).params(stage)
    trained = fbp_kd.Job(config, str(tmp_path / 'one')).params(stage)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-4),
                 restored, trained)
    diffs += [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trained))]
  print(f'2-process run: {seconds:.1f}s; max |param difference| vs 1 process: {max(diffs):.2e}')


def test_distributed_initializes_only_when_asked(monkeypatch):
  from faceflax import distributed  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_JOB_ID',
              'SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  assert not distributed.initialize('auto') and not calls  # one process: nothing to start
  assert not distributed.initialize('off', 'h:1', 2, 0) and not calls
  assert distributed.initialize('on') and calls.pop() == {}  # JAX auto-detects the cluster
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'h:1')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert distributed.initialize('auto', process_id=2)  # flags win over the env
  assert calls.pop() == {'coordinator_address': 'h:1', 'num_processes': 4, 'process_id': 2}
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var)
  monkeypatch.setenv('SLURM_JOB_ID', '7')
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')
  assert distributed.initialize('auto') and calls.pop() == {}  # srun step: JAX reads SLURM
