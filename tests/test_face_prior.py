"""Face-prior pretraining: its losses against NumPy, component masking, the job end to end."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from faceflax import app, losses
from faceflax.data import face_regions, folder, records, synthetic
from faceflax.models import mae
from faceflax.tasks import face_prior
from tests import configs_for_tests
from tests.conftest import SHARED_DATA


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_soft_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  target = _softmax(rng.normal(size=(3, 5, 7)))
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  per_row = -(target * np.log(_softmax(logits))).sum(-1)
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, target), per_row.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, target, weights),
                             (per_row * weights).sum() / weights.sum(), rtol=1e-5)
  one_hot = np.eye(7)[[[1] * 5] * 3]  # a one-hot target is the ordinary cross-entropy
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, one_hot),
                             -np.log(_softmax(logits)[..., 1]).mean(), rtol=1e-5)


def test_pooled_feature_cosine_matches_numpy():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 2, 6, 4)).astype(np.float32)
  member = np.array([[1, 1, 0, 0, 1, 0], [0] * 6], np.float32)  # 2nd face: no component
  p, t = pred[0][member[0] > 0].mean(0), target[0][member[0] > 0].mean(0)
  expected = 1 - p @ t / np.linalg.norm(p) / np.linalg.norm(t)
  np.testing.assert_allclose(losses.pooled_feature_cosine(pred, target, member), expected,
                             rtol=1e-5)
  assert float(losses.pooled_feature_cosine(target, target, member)) == pytest.approx(0, abs=1e-6)


def test_component_members_masks_one_present_component_first():
  b, n, r = 64, 16, len(face_regions.REGIONS)
  rng = np.random.default_rng(2)
  labels = rng.integers(0, r, size=(b, n))
  labels[:, :3] = face_regions.REGIONS.index('eyes')  # eyes always present
  fractions = jnp.asarray(np.eye(r)[labels], jnp.float32)
  member = np.asarray(face_prior.component_members(fractions, 0.5, jax.random.key(0)))
  for i in range(b):
    chosen = set(labels[i][member[i] > 0])
    assert len(chosen) == 1 and face_regions.REGIONS[chosen.pop()] in face_regions.COMPONENTS
  # Members get priority >= 1: masked before any other patch (when they fit the mask).
  _, mask = mae.random_masking(jax.random.key(1), b, n, 0.75, jnp.asarray(member))
  mask, fits = np.asarray(mask), member.sum(1) <= 12
  assert fits.any()
  assert np.all(mask[fits][member[fits] > 0] == 1)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  """Two tiny folder datasets: one with 86-point landmarks (SCUT layout), one without."""
  root = tmp_path_factory.mktemp('prior')
  images, _ = synthetic.make_faces(48, size=32, seed=0)
  for name, with_landmarks in (('lm', True), ('plain', False)):
    (root / name / 'images').mkdir(parents=True)
    rows = []
    for i, image in enumerate(images[:24] if with_landmarks else images[24:]):
      Image.fromarray(image).save(root / name / 'images' / f'{i:02d}.png')
      rows.append((f'{i:02d}.png', 'train' if i < 16 else 'val'))
    with open(root / name / 'labels.csv', 'w', newline='') as f:
      csv.writer(f).writerows([('filename', 'split'), *rows])
    if with_landmarks:  # the template's shapes, as 86 points, are a plausible stand-in
      np.save(root / name / 'landmarks86.npy', _template_landmarks86(24))
  return root


def _template_landmarks86(n):
  path = SHARED_DATA / 'scut_fbp5500' / 'landmarks86.npy'
  if path.exists():
    return np.load(path)[:n]
  pytest.skip('needs real 86-point landmarks to build a landmark fixture')


def _config(root, **prior):
  config = configs_for_tests.load('face_prior', 'test')
  config.data.root = str(root)
  config.data.datasets = 'lm,plain'
  config.prior.update(prior)
  return config


def test_end_to_end_every_term_learns_and_writes_results(data_root, tmp_path):
  config = _config(data_root)
  config.train.steps = 6
  results = app.run(config, str(tmp_path))
  val = results['val']
  for term in ('pixel', 'patch', 'component', 'region_accuracy'):
    assert np.isfinite(val[term]), term
  assert val['n'] + val['n_left_out'] == 16  # 8 val faces per dataset
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['val']['pixel'] == pytest.approx(val['pixel'])


@pytest.mark.parametrize('off', ['pixel', 'patch', 'component'])
def test_a_task_switched_off_has_no_term(data_root, tmp_path, off):
  config = _config(data_root, **{f'{off}_weight': 0.0})
  job = face_prior.Job(config, str(tmp_path))
  stage = job.stage('pretrain')
  state = stage.init_fn(jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in next(stage.batches(start_step=0)).items()}
  loss, terms = stage.loss_fn(state['params'], batch, jax.random.key(1))
  assert off not in terms and np.isfinite(loss)
  expected = sum(config.prior[f'{t}_weight'] * terms[t] for t in face_prior.TERMS if t in terms)
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_a_store_reads_like_its_folder_landmarks_included(data_root, tmp_path):
  """A store prepared from a folder with landmarks86.npy keeps them (a column): the same face
  shapes, and the job's batches equal those read from the folder."""
  store = records.prepare_folder(data_root / 'lm', tmp_path / 'lm_store')
  for split in ('train', 'val'):
    np.testing.assert_array_equal(
        face_regions.load_face_shapes(store, folder.read_folder(store, split)),
        face_regions.load_face_shapes(data_root / 'lm', folder.read_folder(data_root / 'lm', split)))
  from_store = _config(data_root)
  from_store.data.datasets = f'{store},plain'
  batches = [face_prior.Job(c, str(tmp_path / name)).stage('pretrain').batches(start_step=3)
             for c, name in ((_config(data_root), 'a'), (from_store, 'b'))]
  for _ in range(2):
    want, got = next(batches[0]), next(batches[1])
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_bad_configs_are_refused_before_training(data_root, tmp_path):
  with pytest.raises(ValueError, match='at least one'):
    face_prior.check_config(_config(data_root, pixel_weight=0.0, patch_weight=0.0,
                                    component_weight=0.0))
  config = _config(data_root)
  config.data.image_size = 36
  with pytest.raises(ValueError, match='not divisible'):
    face_prior.check_config(config)
