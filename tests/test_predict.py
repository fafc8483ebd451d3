"""Using trained models: face alignment, and --mode=predict / eval of tiny trained fbp_kd and
transfer workdirs (lqfr_kd, age and face-prior workdirs: test_predict_lqfr, test_predict_age_prior)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from faceflax import app, metrics, predict
from faceflax.data import align
from faceflax.data.errors import DataError
from faceflax.train import files
from tests import configs_for_tests, test_transfer
from tests.conftest import REPO, SHARED_DATA, copy_workdir, xla_flags
from tests.predict_helpers import (ALIGN, assert_same_predictions, check_statuses, csv_rows,
                                   needs_detection, real_chips)


# ----------------------------------------------------------------------------- alignment

@pytest.mark.parametrize('dataset', ['scut_fbp5500', 'utkface', 'celeba_id'])
def test_real_faces_are_detected_with_their_eyes(dataset):
  """Chips upscaled to 250 px (a photo-sized face): the face is found and its eyes where they are.

  The truth: SCUT-FBP5500's pupils (landmarks 58, 59); the UTKFace and CelebA chips are
  aligned, so their eyes sit at the template (+-2 px of 112). Errors in eye distances.
  """
  detector = align.Detector()
  chips = real_chips(dataset, 12)
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
  needs_detection()
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
  # An output that cannot be written fails before any scoring, not after it.
  folder = tmp_path / 'already_a_folder'
  folder.mkdir()
  with pytest.raises(files.WorkdirError, match=f'--output={folder} is a folder'):
    app.run(config, str(tmp_path / 'w'), 'predict', str(photos), str(folder))
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(files.WorkdirError, match='--output=.*a_file/scores.csv cannot be written'):
    app.run(config, str(tmp_path / 'w'), 'predict', str(photos), str(blocker / 'scores.csv'))
  assert not (tmp_path / 'w').exists() and blocker.read_text() == 'x'
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

@pytest.fixture
def fbp_workdir(fbp_job):
  return fbp_job[0]  # read only


def test_fbp_predict_statuses_and_scores(fbp_workdir, photos, tmp_path):
  files_before = sorted(fbp_workdir.rglob('*'))
  out = app.run(configs_for_tests.fbp(), str(fbp_workdir), 'predict', str(photos),
                str(tmp_path / 'scores.csv'), align=ALIGN)
  assert sorted(fbp_workdir.rglob('*')) == files_before  # predicting writes nothing there
  rows = csv_rows(tmp_path / 'scores.csv')
  check_statuses(rows, ('teacher_score', 'student_score'))
  assert out['n'] == 4 and out['arrays'] == {}
  for row in rows.values():
    if row['status'] in predict.SCORED:
      assert 1.0 <= float(row['teacher_score']) <= 5.0


def test_fbp_eval_and_unaligned_predict_reproduce_the_val_figures(fbp_workdir, tmp_path):
  """--mode=eval on the training data's folder, and predict --align=none on its images,
  give the training run's own val figures."""
  fbp_workdir = copy_workdir(fbp_workdir, tmp_path / 'w')  # eval writes into it
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
  rows = csv_rows(tmp_path / 'all.csv')
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
  assert_same_predictions(with_data, without)
  assert not (tmp_path / 'moved').exists()


def test_main_py_predict_flags(fbp_workdir, photos, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1))
  out = tmp_path / 'cli.csv'
  subprocess.run([sys.executable, 'main.py', f'--config={REPO}/configs/fbp_kd.py:test',
                  f'--workdir={fbp_workdir}', '--mode=predict', f'--input={photos}',
                  f'--output={out}', '--align=none', '--config.teacher.finetune.from_pretrained=False'],
                 check=True, cwd=REPO, env=env, capture_output=True)
  rows = csv_rows(out)
  assert rows['gradient.png']['status'] == 'ok'  # --align=none scores every decodable image
  assert rows['corrupt.jpg']['status'] == 'corrupt'


@pytest.fixture
def transfer_workdir(transfer_data_root, fbp_job, transfer_job):
  """(workdir, config) of the session's transfer job: every task fine-tuned on tiny drawn
  datasets, the fbp_kd job's pretrained teacher as the backbone; read only."""
  return transfer_job[0], test_transfer.job_config(transfer_data_root, fbp_job[0])


def test_transfer_predict_every_head(transfer_workdir, photos, tmp_path):
  workdir, config = transfer_workdir
  app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 't.csv'), align=ALIGN)
  rows = csv_rows(tmp_path / 't.csv')
  probs = [f'expression_p_{n}' for n in ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise',
                                         'neutral')]
  check_statuses(rows, ('expression', *probs, 'attributes_Smiling', 'attributes_Big_Eyes', 'age',
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
  assert facts['finetune_attributes']['columns'] == list(test_transfer.ATTRIBUTES)
  assert facts['finetune_age']['dataset'] == 'utkface' and facts['finetune_age']['target_sd'] > 0
  config = config.copy_and_resolve_references()
  with_data = app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 'with.csv'),
                      align='none')
  config.data.root = config.backbone.workdir = str(tmp_path / 'moved')
  without = app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 'without.csv'),
                    align='none')
  assert_same_predictions(with_data, without)
  assert 'age' in csv_rows(tmp_path / 'without.csv')['face.jpg']
  assert not (tmp_path / 'moved').exists()
