"""bench/bench_steps.py: every task's step timed without data or TensorFlow; Stage.batch_spec.

The benchmark compiles each step from ``Stage.batch_spec`` alone, so the spec must be what
the input pipeline yields: checked here for every stage of every task against its first
real batch, for the stage built with data and built the way the benchmark builds it.
"""
import os
import subprocess
import sys

import jax
import numpy as np

from faceflax.data import synthetic
from faceflax.tasks import age_mtmsa, face_prior, fbp_kd, lqfr_kd, transfer
from tests import configs_for_tests, predict_helpers
from tests.conftest import REPO, xla_flags

# Runs a script with TensorFlow and clu refused: an accelerator machine may have neither.
WITHOUT_TF = '''
import importlib.abc, runpy, sys
class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'clu'):
      raise ImportError(f'{name} is not installed here (refused by the test)')
sys.meta_path.insert(0, Refuse())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''
# One stage per model family (MAE ViT, ResNeXt-CBAM, ResNet-MSA), the KD step where the
# task has one (its teacher: the benchmark's own random init); each stage compiles its init
# and its update, seconds each on 2 cores. face_prior and transfer build the same MAE: their
# stages' batch specs are checked above.
TIMED = {'fbp_kd': 'student_kd', 'lqfr_kd': 'student_both', 'age_mtmsa': 'train'}


def _bench(task: str, *flags: str) -> subprocess.Popen:
  command = [sys.executable, '-c', WITHOUT_TF, 'bench/bench_steps.py',
             f'--config=configs/{task}.py:test', *flags]
  # 2 devices: batches split over the data axis, at less compile time than the suite's 8.
  # LLVM at -O0: a third less compile time; the values the steps compute do not matter here.
  flags_ = xla_flags(2).replace('optimization_level=1', 'optimization_level=0')
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=flags_)
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _rows(proc: subprocess.Popen) -> dict[str, list[str]]:
  """The printed table of a finished run: {stage: its cells}."""
  out, err = proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_steps_run_without_data_or_tensorflow(tmp_path):
  # Concurrently: each run is mostly single-threaded tracing and compilation. The age step
  # is also profiled (--profile): its trace, its HLO and the op kinds' summary.
  runs = {task: _bench(task, f'--stages={stage}', '--steps=1', '--peak_size=256',
                       *([f'--profile={tmp_path}'] if task == 'age_mtmsa' else []))
          for task, stage in TIMED.items()}
  for task, stage in TIMED.items():
    rows = _rows(runs[task])
    if task == 'age_mtmsa':
      assert (tmp_path / stage / 'step.hlo.txt').read_text().startswith('HloModule')
      assert float(rows['ops:'][0]) > 0  # ms of thread time per step, then one row per kind
      assert any(cells[:1] == ['ms'] and '%' in cells[1] for cells in rows.values())
    batch, img_s, init_s, compile_s, gflops = rows[stage][:5]
    assert int(batch) == 16 and float(img_s) > 0, (task, rows[stage])
    assert float(init_s) > 0 and float(compile_s) > 0 and float(gflops.rstrip('*')) > 0
    if task == 'fbp_kd':  # the same step from shapes alone (compiled: the session's cache)
      aot = _bench(task, '--aot_only', f'--stages={stage}')
  rows = _rows(aot)
  batch, _, gflops, *gib = rows['student_kd']
  assert int(batch) == 16 and float(gflops.rstrip('*')) > 0, rows['student_kd']
  assert all(float(x) >= 0 for x in gib) and float(gib[-1]) > 0  # XLA's memory analysis


# ----------------------------------------------------------------------------- batch_spec

def _assert_spec(stage, *without_data):
  """``batch_spec`` of ``stage`` and of its builds ``without_data`` is its first batch's."""
  batch = next(stage.batches(start_step=0))
  real = {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()}
  for built in (stage, *without_data):
    assert built.batch_spec == {k: jax.ShapeDtypeStruct(*v) for k, v in real.items()}, (
        stage.name, built.batch_spec, real)


def test_batch_spec_is_the_first_batch_fbp_kd(tmp_path):
  config = configs_for_tests.fbp()
  config.student.kd.from_pretrained = False
  for unlabeled in (0, 8):  # the paper's KD batches add unlabeled faces
    config.student.kd.unlabeled_batch_size = unlabeled
    job = fbp_kd.Job(config, str(tmp_path))
    job.provide('teacher_finetune', {'params': None})  # the teacher is no part of the batch
    names = fbp_kd.Job.STAGES if not unlabeled else ('student_kd',)
    for name in names:
      _assert_spec(job.stage(name), job.stage(name, data=False))


def test_batch_spec_is_the_first_batch_lqfr_kd(tmp_path):
  config = configs_for_tests.load('lqfr_kd', 'test')
  s = config.data.synthetic
  config.data.dir = str(synthetic.write_identity_dataset(
      tmp_path / 'ids', num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids,
      per_id=s.per_id, num_pairs=s.num_pairs, size=s.size, seed=s.seed))
  rows = sum(1 for _ in open(tmp_path / 'ids' / 'labels.csv')) - 1
  np.save(tmp_path / 'ids' / 'ext.npy', np.zeros((rows, 24), np.float32))
  config.data.external_teacher = 'ext.npy'
  job = lqfr_kd.Job(config, str(tmp_path / 'w'))
  job.provide('teacher', {'params': None, 'model_state': None})
  for name in ('teacher', 'student_both', 'student_external'):
    _assert_spec(job.stage(name), job.stage(name, data=False))


def test_batch_spec_is_the_first_batch_age_face_prior_transfer(age_faces, transfer_data_root,
                                                               tmp_path):
  config = configs_for_tests.load('age_mtmsa', 'test')
  config.data.dir = str(age_faces)
  job = age_mtmsa.Job(config, str(tmp_path))
  _assert_spec(job.stage('train'), job.stage('train', restore_only=True))

  config = configs_for_tests.load('face_prior', 'test')
  predict_helpers.folder_dataset(tmp_path / 'data' / 'plain', (), lambda i, t: ())
  config.data.root, config.data.datasets = str(tmp_path / 'data'), 'plain'
  job = face_prior.Job(config, str(tmp_path))
  _assert_spec(job.stage('pretrain'), job.stage('pretrain', restore_only=True))

  config = configs_for_tests.load('transfer', 'test')
  config.data.root = str(transfer_data_root)
  (tmp_path / 'transfer').mkdir()
  job = transfer.Job(config, str(tmp_path / 'transfer'), backbone=False)
  for task in transfer.TASKS:  # classes, attributes (several 0/1 targets), values
    name = transfer.stage_name(task)
    _assert_spec(job.stage(name), job.stage(name, restore_only=True))
