"""--mode=predict of tiny trained age (the session's age job) and face-prior workdirs."""
import numpy as np
import pytest

from faceflax import app, predict
from tests.conftest import copy_workdir
from tests.predict_helpers import ALIGN, check_statuses, csv_rows


def test_age_predict(age_job, age_faces, photos, tmp_path):
  from tests import test_age  # pylint: disable=g-import-not-at-top
  config = test_age._config(age_faces)  # pylint: disable=protected-access
  workdir = copy_workdir(age_job[0], tmp_path / 'w')  # app.run(config, workdir), once per session
  app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 'age.csv'), align=ALIGN)
  rows = csv_rows(tmp_path / 'age.csv')
  check_statuses(rows, ('age', 'p_male', 'p_white'))
  for row in rows.values():
    if row['status'] in predict.SCORED:
      assert 0 <= float(row['age']) <= config.model.max_age
      assert row['gender'] in ('male', 'female') and row['race'] in (
          'white', 'black', 'asian', 'indian', 'others')
      assert float(row['p_male']) + float(row['p_female']) == pytest.approx(1.0, abs=1e-5)


def test_face_prior_predict_features(face_prior_job, photos, tmp_path):
  workdir, config = face_prior_job  # app.run(config, workdir), once per session
  out = app.run(config, str(workdir), 'predict', str(photos), str(tmp_path / 'f.csv'),
                align=ALIGN)
  features = np.load(out['arrays']['features'])
  rows = list(csv_rows(tmp_path / 'f.csv').values())
  assert features.shape == (4, 32)
  for row, f in zip(rows, features):
    assert np.isfinite(f).all() == (row['status'] in predict.SCORED)
