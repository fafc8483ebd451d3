"""--mode=predict / verify of a tiny trained lqfr_kd workdir."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from faceflax import app, predict
from faceflax.data.errors import DataError
from faceflax.tasks import lqfr_kd
from tests import configs_for_tests
from tests.conftest import copy_workdir
from tests.predict_helpers import (ALIGN, assert_same_predictions, check_statuses, csv_rows,
                                   needs_detection, real_chips)


# ----------------------------------------------------------------------------- lqfr_kd

@pytest.fixture
def lqfr_workdir(lqfr_job):
  return lqfr_job[0]  # read only


def test_lqfr_predict_writes_embeddings_in_csv_order(lqfr_workdir, photos, tmp_path):
  config = configs_for_tests.load('lqfr_kd', 'test')
  out = app.run(config, str(lqfr_workdir), 'predict', str(photos), str(tmp_path / 'emb.csv'),
                align=ALIGN)
  rows = list(csv_rows(tmp_path / 'emb.csv').values())
  check_statuses({r['file']: r for r in rows}, ('teacher_norm', 'student_both_norm'))
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
  needs_detection()
  config = configs_for_tests.load('lqfr_kd', 'test')
  saved = json.loads((lqfr_workdir / 'results.json').read_text())
  face = photos / 'face.jpg'
  same = app.run(config, str(lqfr_workdir), 'verify', f'{face},{face}')
  for name in ('teacher', 'student_both'):
    assert same[name]['similarity'] == pytest.approx(1.0, abs=1e-5) and same[name]['same']
    assert same[name]['threshold'] == saved[name]['hq']['threshold']
  assert 'teacher: cosine similarity 1.0000' in capsys.readouterr().out
  other = real_chips('utkface', 1)[0].resize((250, 250), Image.BICUBIC)
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
  assert_same_predictions(with_data, without)
  again = app.run(config, str(lqfr_workdir), 'verify', pair, align='none')
  assert again.keys() == verified.keys()
  for name, r in verified.items():
    assert again[name] == {**r, 'similarity': pytest.approx(r['similarity'], abs=1e-6)}
  assert not (tmp_path / 'moved').exists()


def test_lqfr_threshold_is_computed_when_results_have_none(lqfr_workdir, tmp_path):
  workdir = copy_workdir(lqfr_workdir, tmp_path / 'w')
  config = lqfr_kd.with_data_dir(configs_for_tests.load('lqfr_kd', 'test'), str(workdir))
  saved = json.loads((workdir / 'results.json').read_text())
  os.remove(workdir / 'results.json')
  job = lqfr_kd.Job(config, str(workdir), restore_only=True)
  threshold, source = job.threshold('teacher', job.trained_models())
  assert source.endswith('pairs_val.csv (hq)')
  np.testing.assert_allclose(threshold, saved['teacher']['hq']['threshold'], rtol=1e-5)
