"""Stage.batch_spec: the shapes of one batch, known without data.

A step compiles from ``Stage.batch_spec`` alone, so the spec must be what the input
pipeline yields: checked here for every stage of every task against its first real batch,
for the stage built with data and built without it.
"""
import jax
import numpy as np

from faceflax.data import synthetic
from faceflax.tasks import age_mtmsa, face_prior, fbp_kd, lqfr_kd, transfer
from tests import configs_for_tests, predict_helpers


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
    job.provide('teacher_finetune', None)  # the teacher's params are no part of the batch
    names = fbp_kd.STAGES[:-1] if not unlabeled else ('student_kd',)
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
