"""External pretrained teachers: the embedding cache (invalidation by image, view and teacher),
the missing-package message, dlib's network on a real face, and the KD student trained on
a teacher's cached embeddings through the lqfr_kd job."""
import builtins
import json
import os

import numpy as np
import pytest

from faceflax import app, external_teacher, teachers
from faceflax.data import synthetic
from faceflax.tasks import lqfr_kd
from tests import configs_for_tests

SHARED_CELEBA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'celeba_id')


class FakeTeacher:
  """A 4-d 'embedding' of the mean colour per image half (a NumPy reference), counting calls."""
  name, dim, input_size = 'fake', 4, 16
  identity = 'fake-v1'
  embedded = 0

  def embed(self, images):
    FakeTeacher.embedded += len(images)
    x = images.astype(np.float64)
    half = x.shape[2] // 2
    left, right = x[:, :, :half].mean((1, 2, 3)), x[:, :, half:].mean((1, 2, 3))
    return np.stack([left, right, left - right, np.ones_like(left)], 1).astype(np.float32)


def _images(tmp_path, n=5):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  paths = []
  for i in range(n):
    p = tmp_path / f'{i}.png'
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(p)
    paths.append(str(p))
  return paths


def _views(paths):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def views(positions):
    yield np.stack([np.asarray(Image.open(paths[i])) for i in positions])
  return views


def _reference(paths, mirror):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for p in paths:
    x = np.asarray(Image.open(p))[None]
    e = FakeTeacher().embed(x).astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    if mirror:
      m = FakeTeacher().embed(x[:, :, ::-1]).astype(np.float64)
      e = e + m / np.linalg.norm(m, axis=1, keepdims=True)
      e /= np.linalg.norm(e, axis=1, keepdims=True)
    out.append(e[0])
  return np.stack(out)


def test_cache_recomputes_changed_images_views_and_teachers(tmp_path, monkeypatch):
  paths = _images(tmp_path)
  cache = str(tmp_path / 'cache')

  def run(teacher=FakeTeacher(), view='v', mirror=True):
    FakeTeacher.embedded = 0
    emb = teachers.embeddings(teacher, paths, _views(paths), view, cache, mirror_average=mirror,
                              chunk=2)
    return emb, FakeTeacher.embedded

  emb, calls = run()
  assert calls == 2 * len(paths)  # each face and its mirror image
  np.testing.assert_allclose(emb, _reference(paths, mirror=True), rtol=1e-5)
  again, calls = run()
  assert calls == 0
  np.testing.assert_array_equal(again, emb)
  # One image changes: only its row is recomputed, the others come from the cache.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(paths[3])
  changed, calls = run()
  assert calls == 2
  np.testing.assert_array_equal(np.delete(changed, 3, 0), np.delete(emb, 3, 0))
  np.testing.assert_allclose(changed, _reference(paths, mirror=True), rtol=1e-5)
  # Another view, no mirror average, or another teacher identity: all recomputed.
  assert run(view='w')[1] == 2 * len(paths)
  plain, calls = run(mirror=False)
  assert calls == len(paths)
  np.testing.assert_allclose(plain, _reference(paths, mirror=False), rtol=1e-5)
  monkeypatch.setattr(FakeTeacher, 'identity', 'fake-v2')
  assert run()[1] == 2 * len(paths)
  assert sorted(os.listdir(cache)) == ['fake-v1.npz', 'fake-v2.npz']


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_dlib(name, *args, **kwargs):
    if name in ('dlib', 'face_recognition_models'):
      raise ImportError(f'No module named {name!r}')
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, '__import__', no_dlib)
  with pytest.raises(teachers.TeacherUnavailable, match=r'pip install -e \.\[teachers\]'):
    teachers.DlibResNet()
  # A run that needs the teacher stops before any stage trains.
  config = configs_for_tests.load('lqfr_kd', 'test')
  config.data.external_teacher = 'dlib_resnet'
  config.stages = 'student_external,evaluate'
  with pytest.raises(teachers.TeacherUnavailable, match=r'dlib-bin.*\[teachers\]'):
    app.run(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work' / 'student_external').exists()


def test_dlib_resnet_on_a_real_face():
  pytest.importorskip('dlib')
  pytest.importorskip('face_recognition_models')
  if not os.path.isdir(SHARED_CELEBA):
    pytest.skip('no ../shared/data/celeba_id')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import csv  # pylint: disable=g-import-not-at-top
  with open(os.path.join(SHARED_CELEBA, 'labels.csv')) as f:
    names = [row['filename'] for _, row in zip(range(3), csv.DictReader(f))]
  teacher = teachers.DlibResNet()
  faces = np.stack([np.asarray(Image.open(os.path.join(SHARED_CELEBA, 'images', n))
                               .convert('RGB').resize((150, 150), Image.BICUBIC)) for n in names])
  emb = teacher.embed(faces)
  assert emb.shape == (3, 128) and teacher.identity.startswith('dlib_resnet-dlib')
  # The dataset's own embeddings of these chips (teacher_dlib128.npy) came from this network.
  ref = np.load(os.path.join(SHARED_CELEBA, 'teacher_dlib128.npy'))[:3]
  cos = np.sum(emb * ref, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
  assert np.all(cos > 0.99), cos


def test_kd_from_a_teacher_the_project_runs(tmp_path, monkeypatch, photos):
  """student_external on the identities plus unlabeled faces, the teacher's embeddings
  cached beside the workdir (a second run computes none), and the student scored, served
  (--mode=predict, verify) from its workdir when the teacher's package is gone."""
  monkeypatch.setitem(teachers.TEACHERS, 'fake', FakeTeacher)
  config = configs_for_tests.load('lqfr_kd', 'test')
  s = config.data.synthetic
  config.data.dir = str(synthetic.write_identity_dataset(
      tmp_path / 'ids', num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids,
      per_id=s.per_id, num_pairs=s.num_pairs, size=s.size, seed=s.seed))
  more = synthetic.write_identity_dataset(tmp_path / 'more', num_train_ids=3, num_val_ids=2,
                                          per_id=2, num_pairs=4, size=s.size, seed=5)
  config.data.update(external_teacher='fake', unlabeled=str(more), teacher_workers=1)
  config.student.kd.update(arcface=0.0, relational=2.0)
  config.stages = 'student_external,evaluate'
  FakeTeacher.embedded = 0
  results = app.run(config, str(tmp_path / 'runs' / 'a'))
  ts = lqfr_kd.train_set(config)
  eval_images = len(lqfr_kd.verification.eval_pairs(config)[0])
  qualities = len(lqfr_kd.verification.qualities(config))
  # Train faces (identities + the other folder's 6 train faces) and the eval faces per quality.
  assert FakeTeacher.embedded == 2 * (len(ts.labels) + 6 + qualities * eval_images)
  assert set(results) >= {'student_external', 'external_teacher'}
  assert 'teacher' not in results  # nothing needed the faceflax teacher
  assert results['external_teacher']['identity'] == 'fake-v1'
  assert os.listdir(tmp_path / 'runs' / 'teacher_cache') == ['fake-v1.npz']
  rows = [json.loads(line) for line in (tmp_path / 'runs' / 'a' / 'student_external' /
                                        'metrics.jsonl').open()]
  # No ArcFace: the output KD and the relational term alone.
  assert all(r['loss'] == pytest.approx(r['output_kd'] + 2 * r['relational_kd'], rel=1e-6)
             for r in rows)

  # Another run beside it (the next seed of a sweep) finds every train face cached.
  FakeTeacher.embedded = 0
  images, _ = lqfr_kd.distill_set(config, ts)
  lqfr_kd.teacher_embeddings(config, str(tmp_path / 'runs' / 'b'), images)
  assert FakeTeacher.embedded == 0

  def unavailable(self):
    raise teachers.TeacherUnavailable('fake: not installed')
  monkeypatch.setattr(FakeTeacher, '__init__', unavailable)
  workdir = str(tmp_path / 'runs' / 'a')
  again = app.run(config, workdir, mode='eval')
  assert 'external_teacher' not in again
  assert again['student_external']['hq']['accuracy'] == results['student_external']['hq']['accuracy']
  predicted = app.run(config, workdir, 'predict', str(photos), str(tmp_path / 'p.csv'),
                      align='none')
  assert predicted['arrays'] and all('student_external' in a for a in predicted['arrays'])
  verified = app.run(config, workdir, 'verify', f'{photos / "face.jpg"},{photos / "face.jpg"}',
                     align='none')
  assert verified['student_external']['similarity'] == pytest.approx(1.0, abs=1e-5)


def test_centred_targets_keep_what_tells_faces_apart():
  """Embeddings with a large common component: centring gives unit rows with zero mean
  direction, and different faces' cosines fall from near 1 to near 0 (NumPy reference)."""
  rng = np.random.default_rng(0)
  raw = 3.0 + rng.normal(size=(200, 16))  # the common direction dominates
  unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
  out = external_teacher.centred(raw)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
  expected = unit - unit.mean(0)
  np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  off_diagonal = ~np.eye(200, dtype=bool)
  assert (unit @ unit.T)[off_diagonal].mean() > 0.9
  assert abs((out @ out.T)[off_diagonal].mean()) < 0.05


def test_fbp_student_distils_an_external_teachers_score(tmp_path, monkeypatch):
  """fbp_kd with ``student.kd.external``: the student's loss gains the weighted regression on
  the external teacher's score of each face (labeled and unlabeled) and the weighted cosine
  distance to its centred embedding (``embedding_weight``), every face is embedded
  once into the cache, and evaluation scores that teacher alone and averaged with the MAE
  teacher; an unknown teacher name, or an embedding weight without a teacher, is refused
  before any work."""
  from faceflax.tasks import fbp_kd  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(teachers.TEACHERS, 'fake', FakeTeacher)
  config = configs_for_tests.fbp()
  config.stages = 'teacher_finetune,student_kd,evaluate'
  config.student.kd.update(from_pretrained=False, unlabeled_batch_size=8)
  config.student.kd.external.update(teacher='fake', weight=2.0, embedding_weight=0.5, workers=1)
  FakeTeacher.embedded = 0
  results = app.run(config, str(tmp_path / 'runs' / 'a'))
  s = config.data.synthetic
  # Train and eval faces, each with its mirror image; the unlabeled set is the train faces.
  assert FakeTeacher.embedded == 2 * (s.num_train + s.num_val)
  rows = [json.loads(line) for line in (tmp_path / 'runs' / 'a' / 'student_kd' /
                                        'metrics.jsonl').open()]
  kd = config.student.kd
  for r in rows:
    expected = (r['score_loss'] + kd.ld_weight * r['ld_kl'] + kd.alpha * r['output_kd']
                + kd.beta * r['feature_kd'] + 2.0 * r['external_kd']
                + 0.5 * r['external_embedding_kd'])
    assert 0 <= r['external_embedding_kd'] <= 2  # 1 - cosine
    assert r['loss'] == pytest.approx(expected, rel=1e-5)
  assert results['external_teacher']['n'] == s.num_val
  assert {'gamma', 'lambda'} <= set(results['external_teacher'])
  assert np.isfinite(results['teacher_and_external']['pc'])

  config.student.kd.external.teacher = 'dlib'
  with pytest.raises(ValueError, match=r"student.kd.external.teacher='dlib'"):
    fbp_kd.check_config(config)
  config.student.kd.external.teacher = ''
  with pytest.raises(ValueError, match=r'embedding_weight=0.5 needs student.kd.external.teacher'):
    fbp_kd.check_config(config)
