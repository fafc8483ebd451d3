"""The sweep's aggregation against NumPy, and a resumable sweep of real runs."""
import json
from pathlib import Path

import numpy as np
import pytest

from faceflax import sweep

REPO = Path(__file__).resolve().parents[1]


def test_aggregate_matches_numpy():
  rng = np.random.default_rng(0)
  ours = {f'fold{s}': {'student': {'pc': float(v), 'n': 330}, 'name': 'x', 'ok': True}
          for s, v in enumerate(rng.normal(0.8, 0.02, 3))}
  theirs = {f'fold{s}': {'student': {'pc': float(v)}}
            for s, v in enumerate(rng.normal(0.78, 0.02, 4))}
  out = sweep.aggregate(ours, theirs)
  values = np.array([ours[f'fold{s}']['student']['pc'] for s in range(3)])
  pc = out['metrics']['student/pc']
  np.testing.assert_allclose([pc['mean'], pc['std']], [values.mean(), values.std(ddof=1)])
  assert set(out['metrics']) == {'student/pc', 'student/n'}  # numbers only, no bools / text
  diff = values - np.array([theirs[f'fold{s}']['student']['pc'] for s in range(3)])
  d = out['paired_differences']['student/pc']
  assert out['paired_runs'] == ['fold0', 'fold1', 'fold2'] and d['n'] == 3
  np.testing.assert_allclose([d['mean'], d['std'], d['se']],
                             [diff.mean(), diff.std(ddof=1), diff.std(ddof=1) / np.sqrt(3)])
  within = sweep.aggregate(ours, differences=[('student/pc', 'student/n')])
  np.testing.assert_allclose(within['differences']['student/pc - student/n']['values'],
                             values - 330)
  with pytest.raises(ValueError, match=r"\['teacher/pc'\] not in every run"):
    sweep.aggregate(ours, differences=[('teacher/pc', 'student/pc')])
  with pytest.raises(ValueError, match='no run in common'):
    sweep.aggregate(ours, {'fold7': {'student': {'pc': 0.5}}})


def test_sweep_runs_each_missing_seed_once(tmp_path, monkeypatch):
  """Each seed runs main.py with --config.seed and the extra flags; a seed whose run
  finished (results.json) is not run again, so rerunning the command resumes the sweep."""
  calls = []

  def fake_run(command, check):
    assert check
    calls.append(command)
    workdir = Path(next(a for a in command if a.startswith('--workdir='))[len('--workdir='):])
    seed = int(next(a for a in command if a.startswith('--config.seed='))[len('--config.seed='):])
    workdir.mkdir(parents=True)
    (workdir / 'results.json').write_text(json.dumps({'val': {'pc': 0.5 + seed / 10}}))

  monkeypatch.setattr(sweep.subprocess, 'run', fake_run)
  flags = ['sweep', '--config=configs/fbp_kd.py:scut', f'--workdir={tmp_path}', '--seeds=0,2']
  sweep.FLAGS(flags)
  sweep.main(['sweep', '--config.data.input=stream'])
  assert [c[-2:] for c in calls] == [['--config.seed=0', '--config.data.input=stream'],
                                     ['--config.seed=2', '--config.data.input=stream']]
  assert calls[0][1].endswith('main.py') and f'--workdir={tmp_path / "seed0"}' in calls[0]
  sweep.FLAGS(flags[:-1] + ['--seeds=0,1,2'])
  sweep.main(['sweep', '--config.reuse_from=/other/{run}'])
  assert len(calls) == 3 and calls[2][-2:] == [  # only the missing seed
      '--config.seed=1', '--config.reuse_from=/other/seed1']
  out = json.loads((tmp_path / 'sweep.json').read_text())
  np.testing.assert_allclose(out['metrics']['val/pc']['values'], [0.5, 0.6, 0.7])


def test_folds_times_seeds():
  plan = sweep.planned_runs([0, 1], [1, 2], '--config.data.cv_fold')
  assert plan['fold2_seed1'] == ['--config.seed=1', '--config.data.cv_fold=2'] and len(plan) == 4
  assert list(sweep.planned_runs([0], [3], '--f')) == ['fold3']


def test_fbp_cross_validation_fold_inside_the_folder(tmp_path):
  """data.cv_fold=k: the rows of fold k are scored, all the others (train and val) train."""
  from faceflax.data import DataError  # pylint: disable=g-import-not-at-top
  from faceflax.tasks import fbp_kd  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests, predict_helpers  # pylint: disable=g-import-not-at-top
  root = predict_helpers.folder_dataset(tmp_path / 'faces', ('score', 'cv5_test_fold'),
                                        lambda i, t: (2.5, i % 5 + 1), n_train=20, n_val=10)
  config = configs_for_tests.fbp()
  config.data.dir = str(root)
  config.data.cv_fold = 3
  train = fbp_kd.labeled_examples(config, 'train', str(tmp_path))
  held_out = fbp_kd.labeled_examples(config, 'val', str(tmp_path))
  assert len(train) == 24 and len(held_out) == 6  # 30 rows, fold 3 = rows 2, 7, 12, ...
  assert set(held_out.labels['cv5_test_fold']) == {3} and 3 not in set(train.labels['cv5_test_fold'])
  assert not set(train.paths) & set(held_out.paths)
  config.data.cv_fold = 6
  with pytest.raises(DataError, match=r"no fold 6 \(folds: \[1, 2, 3, 4, 5\]\)"):
    fbp_kd.labeled_examples(config, 'val', str(tmp_path))
  config.data.cv_fold = -1
  with pytest.raises(ValueError, match='data.cv_fold=-1'):
    fbp_kd.check_config(config)
