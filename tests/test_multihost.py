"""Two processes on localhost (CPU, gloo) = one process over the same global batch.

Each process of ``main.py`` has 4 simulated devices (8 in all, as in this test
process), reads its half of every batch and of the evaluation set, and both
write one Orbax checkpoint that this single process then restores.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from faceflax import app
from faceflax.tasks import fbp_kd
from tests import configs_for_tests
from tests.conftest import REPO, xla_flags

OVERRIDES = {'stages': 'teacher_finetune,student_kd,evaluate',
             'teacher.finetune.from_pretrained': False, 'student.kd.from_pretrained': False,
             # 37 val faces in batches of 16: the last batch has 5 rows, all on process 0.
             'data.synthetic.num_val': 37, 'train.checkpoint_every': 4}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_process_run(workdir, log_dir):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(4),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  procs, logs = [], []
  for i in range(2):
    logs.append(open(log_dir / f'process{i}.log', 'w'))
    procs.append(subprocess.Popen(
        [sys.executable, str(REPO / 'main.py'), f'--config={REPO}/configs/fbp_kd.py:test',
         f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in OVERRIDES.items()),
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


def _config():
  config = configs_for_tests.load('fbp_kd', 'test')
  for key, value in OVERRIDES.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_two_processes_equal_one_and_their_checkpoint_restores_in_one(tmp_path):
  t0 = time.perf_counter()
  log = _two_process_run(tmp_path / 'two', tmp_path)
  seconds = time.perf_counter() - t0
  assert 'process 0 of 2, 4 local / 8 global devices' in log

  config = _config()
  assert jax.device_count() == 8 and jax.process_count() == 1
  one = app.run(config, str(tmp_path / 'one'))
  two = json.loads((tmp_path / 'two' / 'results.json').read_text())
  for who in ('teacher', 'student'):
    assert two[who]['n'] == one[who]['n'] == 37  # every val face exactly once
    for k in ('pc', 'mae', 'rmse'):
      np.testing.assert_allclose(two[who][k], one[who][k], rtol=1e-4, atol=1e-5)

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
