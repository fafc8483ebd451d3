"""The sweep's aggregation against NumPy, and a resumable sweep of real runs."""
import json
from pathlib import Path

import numpy as np
import pytest

from faceflax import sweep

REPO = Path(__file__).resolve().parents[1]


def test_aggregate_matches_numpy():
  rng = np.random.default_rng(0)
  ours = {s: {'student': {'pc': float(v), 'n': 330}, 'name': 'x', 'ok': True}
          for s, v in enumerate(rng.normal(0.8, 0.02, 3))}
  theirs = {s: {'student': {'pc': float(v)}} for s, v in enumerate(rng.normal(0.78, 0.02, 4))}
  out = sweep.aggregate(ours, theirs)
  values = np.array([ours[s]['student']['pc'] for s in range(3)])
  pc = out['metrics']['student/pc']
  np.testing.assert_allclose([pc['mean'], pc['std']], [values.mean(), values.std(ddof=1)])
  assert set(out['metrics']) == {'student/pc', 'student/n'}  # numbers only, no bools / text
  diff = values - np.array([theirs[s]['student']['pc'] for s in range(3)])
  d = out['paired_differences']['student/pc']
  assert out['paired_seeds'] == [0, 1, 2] and d['n'] == 3
  np.testing.assert_allclose([d['mean'], d['std'], d['se']],
                             [diff.mean(), diff.std(ddof=1), diff.std(ddof=1) / np.sqrt(3)])
  with pytest.raises(ValueError, match='no seed in common'):
    sweep.aggregate(ours, {7: {'student': {'pc': 0.5}}})


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
  sweep.main(['sweep'])
  assert len(calls) == 3 and '--config.seed=1' in calls[2]  # only the missing seed
  out = json.loads((tmp_path / 'sweep.json').read_text())
  np.testing.assert_allclose(out['metrics']['val/pc']['values'], [0.5, 0.6, 0.7])
