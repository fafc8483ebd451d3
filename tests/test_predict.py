"""Using trained models: face alignment, --mode=predict / eval / verify on tiny trained workdirs."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from faceflax import app, metrics, predict
from faceflax.data import align, synthetic
from faceflax.data.errors import DataError
from faceflax.tasks import lqfr_kd
from tests import configs_for_tests
from tests.conftest import REPO, SHARED_DATA

# The Haar detector finds no drawn face: without ../shared/data, the tests that check
# per-file statuses and outputs score the photos unaligned instead of skipping.
ALIGN = 'auto' if (SHARED_DATA / 'celeba_id' / 'labels.csv').exists() else 'none'


def _real_chips(dataset: str, n: int) -> list:
  """The first ``n`` chips of a shared dataset (skips the test when the data is absent)."""
  path = SHARED_DATA / dataset
  if not (path / 'labels.csv').exists():
    pytest.skip(f'real data {path} is not available')
  with open(path / 'labels.csv') as f:
    names = [row['filename'] for row in csv.DictReader(f)][:n]
  return [Image.open(path / 'images' / name).convert('RGB') for name in names]


def _face(size: int = 250) -> Image.Image:
  """A real face chip upscaled like a photo; a drawn face when ../shared/data is absent."""
  if (SHARED_DATA / 'celeba_id' / 'labels.csv').exists():
    return _real_chips('celeba_id', 1)[0].resize((size, size), Image.BICUBIC)
  drawn, _ = synthetic.make_faces(1, size=64, seed=0)
  return Image.fromarray(drawn[0]).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """face.jpg, gradient.png (no face), two.jpg (two faces), corrupt.jpg, notes.txt (not an image)."""
  root = tmp_path_factory.mktemp('photos')
  _face().save(root / 'face.jpg', quality=95)
  ramp = np.linspace(0, 255, 240)
  Image.fromarray(np.stack([np.tile(ramp, (180, 1))] * 3, -1).astype(np.uint8)).save(
      root / 'gradient.png')
  canvas = Image.new('RGB', (520, 300), (120, 120, 120))
  canvas.paste(_face(230), (15, 35))
  canvas.paste(_face(230).transpose(Image.FLIP_LEFT_RIGHT), (275, 35))
  canvas.save(root / 'two.jpg', quality=95)
  (root / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + b'not a jpeg' * 20)
  (root / 'notes.txt').write_text('not an image')
  return root


def _rows(path) -> dict:
  with open(path) as f:
    return {row['file']: row for row in csv.DictReader(f)}


def _assert_same_predictions(a: dict, b: dict):
  """Two --mode=predict results (CSV rows and .npy arrays) agree to 1e-6."""
  rows_a, rows_b = _rows(a['output']), _rows(b['output'])
  assert rows_a.keys() == rows_b.keys()
  for name, row in rows_a.items():
    assert row.keys() == rows_b[name].keys()
    for column, value in row.items():
      try:
        np.testing.assert_allclose(float(value), float(rows_b[name][column]), rtol=1e-6,
                                   atol=1e-6, err_msg=f'{name} {column}')
      except ValueError:  # not a number: status, class name, note, empty cell
        assert value == rows_b[name][column], (name, column)
  assert a['arrays'].keys() == b['arrays'].keys()
  for name, path in a['arrays'].items():
    np.testing.assert_allclose(np.load(path), np.load(b['arrays'][name]), rtol=1e-6, atol=1e-6)


def _needs_detection():
  if not (SHARED_DATA / 'celeba_id' / 'labels.csv').exists():
    pytest.skip('face detection is tested on real faces; ../shared/data is not available')


def _check_statuses(rows: dict, score_columns):
  """Every input file is a row: the face scored, the others reported with an empty score."""
  assert set(rows) == {'face.jpg', 'gradient.png', 'two.jpg', 'corrupt.jpg'}
  assert rows['corrupt.jpg']['status'] == 'corrupt' and rows['corrupt.jpg']['note']
  if (SHARED_DATA / 'celeba_id' / 'labels.csv').exists():
    assert (rows['face.jpg']['status'], rows['face.jpg']['faces']) == ('ok', '1')
    assert (rows['two.jpg']['status'], rows['two.jpg']['faces']) == ('several_faces', '2')
    assert (rows['gradient.png']['status'], rows['gradient.png']['faces']) == ('no_face', '0')
  for name, row in rows.items():
    scored = row['status'] in predict.SCORED
    for column in score_columns:
      assert (row[column] != '') == scored, (name, column)


# ----------------------------------------------------------------------------- alignment

@pytest.mark.parametrize('dataset', ['scut_fbp5500', 'utkface', 'celeba_id'])
def test_real_faces_are_detected_with_their_eyes(dataset):
  """Chips upscaled to 250 px (a photo-sized face): the face is found and its eyes where they are.

  The truth: SCUT-FBP5500's pupils (landmarks 58, 59); the UTKFace and CelebA chips are
  aligned, so their eyes sit at the template (+-2 px of 112). Errors in eye distances.
  """
  detector = align.Detector()
  chips = _real_chips(dataset, 12)
  if dataset == 'scut_fbp5500':
    truth = np.load(SHARED_DATA / dataset / 'landmarks86.npy')[:12, 58:60] / 112
  else:
    truth = [align.template_for(dataset)] * len(chips)
  errors = []
  for chip, eyes in zip(chips, truth):
    found, aligned = align.align(detector, np.asarray(chip.resize((250, 250), Image.BICUBIC)),
                                 align.template_for(dataset))
    if aligned is not None:
      assert aligned.shape == (112, 112, 3) and found.faces >= 1
      errors.append(np.abs(found.eyes / 250 - eyes).max() / np.linalg.norm(eyes[1] - eyes[0]))
  assert len(errors) >= 10, f'{dataset}: only {len(errors)} of {len(chips)} faces found'
  assert np.median(errors) < 0.1 and max(errors) < 0.3, errors


def test_no_face_and_two_faces(photos):
  _needs_detection()
  detector = align.Detector()
  load = lambda name: np.asarray(Image.open(photos / name).convert('RGB'))
  assert align.detect(detector, load('gradient.png')).status == 'no_face'
  two = align.detect(detector, load('two.jpg'))
  assert (two.status, two.faces) == ('several_faces', 2)
  one = align.detect(detector, load('face.jpg'))
  assert (one.status, one.faces) == ('ok', 1) and one.eyes[0, 0] < one.eyes[1, 0]


def test_similarity_maps_the_eyes_onto_the_template():
  src = np.array([[30.0, 40.0], [70.0, 52.0]])
  dst = align.template_for('celeba_id') * 112
  m = align.similarity(src, dst)
  np.testing.assert_allclose(src @ m[:, :2].T + m[:, 2], dst, atol=1e-9)
  assert align.template_name('/data/utkface/') == 'utkface'
  assert align.template_name('mine') == 'arcface'


def test_inputs_are_checked_before_any_model_loads(tmp_path, photos):
  config = configs_for_tests.fbp()
  with pytest.raises(DataError, match='nowhere.jpg: no such file'):
    app.run(config, str(tmp_path), 'predict', str(tmp_path / 'nowhere.jpg'), 'o.csv')
  with pytest.raises(ValueError, match='needs --output'):
    app.run(config, str(tmp_path), 'predict', str(photos), '')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(DataError, match='no image files'):
    predict.list_inputs(str(empty))
  with pytest.raises(ValueError, match='two photos'):
    predict.verify_pair(str(photos / 'face.jpg'))
  with pytest.raises(ValueError, match='not available for task'):
    app.run(config, str(tmp_path), 'verify', f'{photos}/face.jpg,{photos}/two.jpg')
  assert not (tmp_path / 'teacher_finetune').exists()


# ----------------------------------------------------------------------------- fbp_kd

@pytest.fixture(scope='module')
def fbp_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('fbp')
  app.run(configs_for_tests.fbp(), str(workdir))
  return workdir


def test_fbp_predict_statuses_and_scores(fbp_workdir, photos, tmp_path):
  out = app.run(configs_for_tests.fbp(), str(fbp_workdir), 'predict', str(photos),
                str(tmp_path / 'scores.csv'), align=ALIGN)
  rows = _rows(tmp_path / 'scores.csv')
  _check_statuses(rows, ('teacher_score', 'student_score'))
  assert out['n'] == 4 and out['arrays'] == {}
  for row in rows.values():
    if row['status'] in predict.SCORED:
      assert 1.0 <= float(row['teacher_score']) <= 5.0


def test_fbp_eval_and_unaligned_predict_reproduce_the_val_figures(fbp_workdir, tmp_path):
  """--mode=eval on the training data's folder, and predict --align=none on its images,
  give the training run's own val figures."""
  saved = json.loads((fbp_workdir / 'results.json').read_text())
  data = fbp_workdir / 'synthetic_faces'
  config = configs_for_tests.fbp()
  config.data.dir, config.eval.split = str(data), 'val'
  again = app.run(config, str(fbp_workdir), 'eval')
  assert json.loads((fbp_workdir / 'eval_synthetic_faces.json').read_text())['data']['n'] == 32
  for who in ('teacher', 'student'):
    for k in ('pc', 'mae', 'rmse'):
      np.testing.assert_allclose(again[who][k], saved[who][k], rtol=1e-5, atol=1e-6)
  app.run(configs_for_tests.fbp(), str(fbp_workdir), 'predict', str(data / 'images'),
          str(tmp_path / 'all.csv'), align='none')
  rows = _rows(tmp_path / 'all.csv')
  with open(data / 'labels.csv') as f:
    val = [r for r in csv.DictReader(f) if r['split'] == 'val']
  assert all(rows[r['filename']]['alignment'] == 'none' for r in val)
  truth = np.array([float(r['score']) for r in val])
  for who in ('teacher', 'student'):
    pred = np.array([float(rows[r['filename']][f'{who}_score']) for r in val])
    report = metrics.regression_report(pred, truth)
    for k in ('pc', 'mae', 'rmse'):
      np.testing.assert_allclose(report[k], saved[who][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('align_mode', ['auto', 'none'])
def test_fbp_predict_needs_only_the_workdir(fbp_workdir, photos, tmp_path, align_mode):
  """With data.dir naming a folder that is not there (one with its own alignment template),
  predict gives what it gives with the training data: model_facts.json has what it needs."""
  assert json.loads((fbp_workdir / 'model_facts.json').read_text()) == {'dataset': ''}
  config = configs_for_tests.fbp()
  with_data = app.run(config, str(fbp_workdir), 'predict', str(photos),
                      str(tmp_path / 'with.csv'), align=align_mode)
  config.data.dir = str(tmp_path / 'moved' / 'scut_fbp5500')
  without = app.run(config, str(fbp_workdir), 'predict', str(photos),
                    str(tmp_path / 'without.csv'), align=align_mode)
  _assert_same_predictions(with_data, without)
  assert not (tmp_path / 'moved').exists()


def test_main_py_predict_flags(fbp_workdir, photos, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  out = tmp_path / 'cli.csv'
  subprocess.run([sys.executable, 'main.py', f'--config={REPO}/configs/fbp_kd.py:test',
                  f'--workdir={fbp_workdir}', '--mode=predict', f'--input={photos}',
                  f'--output={out}', '--align=none', '--config.teacher.finetune.from_pretrained=False'],
                 check=True, cwd=REPO, env=env, capture_output=True)
  rows = _rows(out)
  assert rows['gradient.png']['status'] == 'ok'  # --align=none scores every decodable image
  assert rows['corrupt.jpg']['status'] == 'corrupt'


# ----------------------------------------------------------------------------- lqfr_kd

@pytest.fixture(scope='module')
def lqfr_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('lqfr')
  config = configs_for_tests.load('lqfr_kd', 'test')
  app.run(config, str(workdir))
  return workdir


def test_lqfr_predict_writes_embeddings_in_csv_order(lqfr_workdir, photos, tmp_path):
  config = configs_for_tests.load('lqfr_kd', 'test')
  out = app.run(config, str(lqfr_workdir), 'predict', str(photos), str(tmp_path / 'emb.csv'),
                align=ALIGN)
  rows = list(_rows(tmp_path / 'emb.csv').values())
  _check_statuses({r['file']: r for r in rows}, ('teacher_norm', 'student_both_norm'))
  assert set(out['arrays']) == {'teacher', 'student_both'}
  for name in ('teacher', 'student_both'):
    emb = np.load(tmp_path / f'emb_{name}.npy')
    assert emb.shape == (4, 16)
    for i, row in enumerate(rows):
      if row['status'] in predict.SCORED:
        np.testing.assert_allclose(np.linalg.norm(emb[i]), 1.0, rtol=1e-5)
        assert float(row[f'{name}_norm']) > 0
      else:
        assert np.isnan(emb[i]).all()


def test_lqfr_verify_same_and_different(lqfr_workdir, photos, tmp_path, capsys):
  _needs_detection()
  config = configs_for_tests.load('lqfr_kd', 'test')
  saved = json.loads((lqfr_workdir / 'results.json').read_text())
  face = photos / 'face.jpg'
  same = app.run(config, str(lqfr_workdir), 'verify', f'{face},{face}')
  for name in ('teacher', 'student_both'):
    assert same[name]['similarity'] == pytest.approx(1.0, abs=1e-5) and same[name]['same']
    assert same[name]['threshold'] == saved[name]['hq']['threshold']
  assert 'teacher: cosine similarity 1.0000' in capsys.readouterr().out
  other = _real_chips('utkface', 1)[0].resize((250, 250), Image.BICUBIC)
  other.save(tmp_path / 'other.jpg')
  different = app.run(config, str(lqfr_workdir), 'verify', f'{face},{tmp_path / "other.jpg"}')
  for r in different.values():
    assert -1.0 <= r['similarity'] <= 1.0 and isinstance(r['same'], bool)
  with pytest.raises(DataError, match='gradient.png: no_face'):
    app.run(config, str(lqfr_workdir), 'verify', f'{face},{photos / "gradient.png"}')


def test_lqfr_predict_and_verify_need_only_the_workdir(lqfr_workdir, photos, tmp_path):
  """The ArcFace heads' class count and the alignment template's folder come from
  model_facts.json: with data.dir naming a folder that is not there, predict and verify
  (threshold from results.json) give what they give with the training data."""
  facts = json.loads((lqfr_workdir / 'model_facts.json').read_text())
  assert facts == {'num_classes': 6, 'dataset': 'synthetic_identities'}
  config = configs_for_tests.load('lqfr_kd', 'test')
  pair = f'{photos / "face.jpg"},{photos / "two.jpg"}'
  with_data = app.run(config, str(lqfr_workdir), 'predict', str(photos),
                      str(tmp_path / 'with.csv'), align='none')
  verified = app.run(config, str(lqfr_workdir), 'verify', pair, align='none')
  config.data.dir = str(tmp_path / 'moved' / 'celeba_id')
  without = app.run(config, str(lqfr_workdir), 'predict', str(photos),
                    str(tmp_path / 'without.csv'), align='none')
  _assert_same_predictions(with_data, without)
  again = app.run(config, str(lqfr_workdir), 'verify', pair, align='none')
  assert again.keys() == verified.keys()
  for name, r in verified.items():
    assert again[name] == {**r, 'similarity': pytest.approx(r['similarity'], abs=1e-6)}
  assert not (tmp_path / 'moved').exists()


def test_lqfr_threshold_is_computed_when_results_have_none(lqfr_workdir):
  config = lqfr_kd.with_data_dir(configs_for_tests.load('lqfr_kd', 'test'), str(lqfr_workdir))
  saved = json.loads((lqfr_workdir / 'results.json').read_text())
  results = lqfr_workdir / 'results.json'
  shutil.move(results, lqfr_workdir / 'results.json.bak')
  try:
    job, models = lqfr_kd.trained(config, str(lqfr_workdir))
    threshold, source = lqfr_kd.validated_threshold(config, job, 'teacher', *models['teacher'])
  finally:
    shutil.move(lqfr_workdir / 'results.json.bak', results)
  assert source.endswith('pairs_val.csv (hq)')
  np.testing.assert_allclose(threshold, saved['teacher']['hq']['threshold'], rtol=1e-5)


# ----------------------------------------------------------------------------- age, face prior, transfer

def _folder_dataset(root, header, label_fn, n_train=32, n_val=16):
  (root / 'images').mkdir(parents=True)
  drawn, traits = synthetic.make_faces(n_train + n_val, size=32, seed=0)
  rows = []
  for i, image in enumerate(drawn):
    Image.fromarray(image).save(root / 'images' / f'{i:03d}.png')
    rows.append((f'{i:03d}.png', *label_fn(i, {k: v[i] for k, v in traits.items()}),
                 'train' if i < n_train else 'val'))
  with open(root / 'labels.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('filename', *header, 'split'), *rows])
  return root


def test_age_predict(photos, tmp_path):
  data = _folder_dataset(tmp_path / 'ages', ('age', 'gender', 'race'),
                         lambda i, t: (10 + 2 * i, i % 2, i % 5))
  config = configs_for_tests.load('age_mtmsa', 'test')
  config.data.dir = str(data)
  app.run(config, str(tmp_path / 'w'))
  app.run(config, str(tmp_path / 'w'), 'predict', str(photos), str(tmp_path / 'age.csv'),
          align=ALIGN)
  rows = _rows(tmp_path / 'age.csv')
  _check_statuses(rows, ('age', 'p_male', 'p_white'))
  for row in rows.values():
    if row['status'] in predict.SCORED:
      assert 0 <= float(row['age']) <= config.model.max_age
      assert row['gender'] in ('male', 'female') and row['race'] in (
          'white', 'black', 'asian', 'indian', 'others')
      assert float(row['p_male']) + float(row['p_female']) == pytest.approx(1.0, abs=1e-5)


def test_face_prior_predict_features(photos, tmp_path):
  _folder_dataset(tmp_path / 'data' / 'plain', (), lambda i, t: ())
  config = configs_for_tests.load('face_prior', 'test')
  config.data.root, config.data.datasets = str(tmp_path / 'data'), 'plain'
  app.run(config, str(tmp_path / 'w'))
  out = app.run(config, str(tmp_path / 'w'), 'predict', str(photos), str(tmp_path / 'f.csv'),
                align=ALIGN)
  features = np.load(out['arrays']['features'])
  rows = list(_rows(tmp_path / 'f.csv').values())
  assert features.shape == (4, 32)
  for row, f in zip(rows, features):
    assert np.isfinite(f).all() == (row['status'] in predict.SCORED)


@pytest.fixture(scope='module')
def transfer_workdir(fbp_workdir, tmp_path_factory):
  """(workdir, config): every task fine-tuned on tiny drawn datasets, the fbp_kd fixture's
  pretrained teacher as the backbone."""
  tmp = tmp_path_factory.mktemp('transfer')
  pm = lambda x: 1 if x > 0 else -1
  root = tmp / 'data'
  _folder_dataset(root / 'fer2013', ('label',), lambda i, t: (i % 7,))
  _folder_dataset(root / 'celeba_id', ('identity', 'id_noisy', 'Smiling', 'Big_Eyes'),
                  lambda i, t: (i // 4, 0, pm(t['smile']), pm(t['eye_size'])))
  _folder_dataset(root / 'utkface', ('age',), lambda i, t: (int(40 + 15 * t['eye_height']),))
  _folder_dataset(root / 'scut_fbp5500', ('score',), lambda i, t: (f'{t["score"]:.3f}',))
  config = configs_for_tests.load('transfer', 'test')
  config.data.root, config.protocols = str(root), 'finetune'
  config.backbone.update(workdir=str(fbp_workdir), stage='teacher_pretrain')
  config.backbone.model.update(stem='multiscale', stem_channels=24, stem_stride=2)  # its model
  app.run(config, str(tmp / 'w'))
  return tmp / 'w', config


def test_transfer_predict_every_head(transfer_workdir, photos, tmp_path):
  workdir, config = transfer_workdir
  app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 't.csv'), align=ALIGN)
  rows = _rows(tmp_path / 't.csv')
  probs = [f'expression_p_{n}' for n in ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise',
                                         'neutral')]
  _check_statuses(rows, ('expression', *probs, 'attributes_Smiling', 'attributes_Big_Eyes', 'age',
                         'beauty'))
  header = next(csv.reader(open(tmp_path / 't.csv')))
  assert header[:5] == ['file', 'status', 'faces', 'alignment', 'expression']
  for row in rows.values():
    if row['status'] in predict.SCORED:
      p = np.array([float(row[c]) for c in probs])
      assert p.sum() == pytest.approx(1.0, abs=1e-4)
      assert row['expression'] == probs[int(p.argmax())][len('expression_p_'):]
      assert 0 <= float(row['attributes_Smiling']) <= 1


def test_transfer_predict_needs_only_the_workdir(transfer_workdir, photos, tmp_path):
  """With data.root and backbone.workdir naming folders that are not there, the same
  predictions: the fine-tuned stages hold the whole backbone, model_facts.json the rest."""
  workdir, config = transfer_workdir
  facts = json.loads((workdir / 'model_facts.json').read_text())
  assert facts['finetune_expression']['class_names'][0] == 'angry'
  assert facts['finetune_attributes']['columns'] == ['Smiling', 'Big_Eyes']
  assert facts['finetune_age']['dataset'] == 'utkface' and facts['finetune_age']['target_sd'] > 0
  config = config.copy_and_resolve_references()
  with_data = app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 'with.csv'),
                      align='none')
  config.data.root = config.backbone.workdir = str(tmp_path / 'moved')
  without = app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 'without.csv'),
                    align='none')
  _assert_same_predictions(with_data, without)
  assert 'age' in _rows(tmp_path / 'without.csv')['face.jpg']
  assert not (tmp_path / 'moved').exists()
