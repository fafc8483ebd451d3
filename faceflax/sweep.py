"""Runs one config over several seeds and/or cross-validation folds and aggregates the runs'
results into mean +- std and paired differences.

  python -m faceflax.sweep --config=configs/age_mtmsa.py:utkface --workdir=W --seeds=0,1,2
  python -m faceflax.sweep --config=configs/fbp_kd.py:scut --workdir=W --folds=1,2,3,4,5 \
      [--compare=W_OTHER] [-- --config.student.kd.alpha=0 ...]

Each run trains in ``W/<run>`` (``seed0``, ``fold3`` or ``fold3_seed1``) through ``main.py``
with ``--config.seed=N`` and ``--config.data.cv_fold=K`` (``--fold_flag``), the flags after
``--`` appended ('{run}' in them becomes the run's name: an ablation can reuse the stages of
the same run of another sweep, ``--config.reuse_from=W_OTHER/{run}``). A run whose
``results.json`` exists is not redone and an interrupted one resumes from its checkpoints,
so rerunning the command finishes the sweep. ``W/sweep.json``
then holds, for every number in the runs' ``results.json``, its per-run values, mean and
sample std; ``--differences=A:B`` adds the difference of two metrics within each run (an
ablation scored in the same results.json), and ``--compare`` (another sweep's workdir with the
same runs) the paired difference (this - other) of every metric per run: mean, std and
standard error (std / sqrt(n)).
"""
import json
import math
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string('config', None, 'config file and preset, as for main.py')
flags.DEFINE_string('workdir', None, 'the sweep folder: one run per seed below it')
flags.DEFINE_list('seeds', ['0'], 'seeds to run (each fold with each seed)')
flags.DEFINE_list('folds', [], 'cross-validation folds to run (none: no fold flag)')
flags.DEFINE_string('fold_flag', '--config.data.cv_fold', 'the flag that selects a fold')
flags.DEFINE_string('compare', '', 'another sweep workdir: paired differences per run')
flags.DEFINE_list('differences', [], 'A:B pairs of metric paths (as in sweep.json): the '
                  'paired difference A - B within each run, e.g. an ablation scored in the same '
                  'results.json (student_both/x4/accuracy:student_nokd/x4/accuracy)')
flags.DEFINE_boolean('aggregate_only', False, 'only aggregate the runs that finished')


def numbers(results: dict, prefix: str = '') -> dict:
  """Every finite number of a results tree, by '/'-joined path."""
  out = {}
  for key, value in results.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(numbers(value, path + '/'))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      out[path] = float(value)
  return out


def summary(values: list[float]) -> dict:
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float('nan')
  return {'n': n, 'mean': mean, 'std': std, 'se': std / math.sqrt(n), 'values': values}


def aggregate(runs: dict, other: dict | None = None, differences=()) -> dict:
  """``runs``: {run name: results}; the metrics every run has, summarised over the runs;
  ``differences``: (A, B) metric paths, A - B within each run; with ``other`` ({run name:
  results} of another sweep) the paired differences this - other of every metric."""
  per_run = {name: numbers(r) for name, r in runs.items()}
  names = sorted(per_run)
  keys = sorted(set.intersection(*(set(v) for v in per_run.values()))) if per_run else []
  out = {'runs': names, 'metrics': {k: summary([per_run[n][k] for n in names]) for k in keys}}
  for a, b in differences:
    missing = [k for k in (a, b) if k not in keys]
    if missing:
      raise ValueError(f'--differences={a}:{b}: {missing} not in every run (metrics: '
                       f'{", ".join(keys[:20])}{", ..." if len(keys) > 20 else ""})')
    out.setdefault('differences', {})[f'{a} - {b}'] = summary(
        [per_run[n][a] - per_run[n][b] for n in names])
  if other is not None:
    theirs = {name: numbers(r) for name, r in other.items()}
    paired = [n for n in names if n in theirs]
    if not paired:
      raise ValueError(f'--compare: no run in common (this sweep: {names}, '
                       f'the other: {sorted(theirs)})')
    out['paired_runs'] = paired
    out['paired_differences'] = {
        k: summary([per_run[n][k] - theirs[n][k] for n in paired])
        for k in keys if all(k in theirs[n] for n in paired)}
  return out


def planned_runs(seeds, folds, fold_flag) -> dict:
  """{run name: its flags} of every fold x seed."""
  runs = {}
  for fold in folds or [None]:
    for seed in seeds:
      name = f'seed{seed}' if fold is None else (
          f'fold{fold}' if len(seeds) == 1 else f'fold{fold}_seed{seed}')
      runs[name] = [f'--config.seed={seed}'] + ([] if fold is None else [f'{fold_flag}={fold}'])
  return runs


def finished_runs(workdir: str, names=None) -> dict:
  """{run name: results} of the finished runs below ``workdir`` (of ``names``, or all)."""
  if names is None:
    names = sorted(d for d in os.listdir(workdir)
                   if os.path.isfile(os.path.join(workdir, d, 'results.json')))
  runs = {}
  for name in names:
    path = os.path.join(workdir, name, 'results.json')
    if os.path.isfile(path):
      with open(path) as f:
        runs[name] = json.load(f)
  return runs


def main(argv):
  extra = argv[1:]
  if not FLAGS.workdir or not FLAGS.config:
    raise app.UsageError('--config and --workdir are required')
  plan = planned_runs([int(s) for s in FLAGS.seeds], [int(f) for f in FLAGS.folds],
                      FLAGS.fold_flag)
  if not FLAGS.aggregate_only:
    main_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'main.py')
    for name, run_flags in plan.items():
      workdir = os.path.join(FLAGS.workdir, name)
      if os.path.isfile(os.path.join(workdir, 'results.json')):
        continue  # finished earlier
      subprocess.run([sys.executable, main_py, f'--config={FLAGS.config}',
                      f'--workdir={workdir}', *run_flags,
                      *(f.replace('{run}', name) for f in extra)], check=True)
  runs = finished_runs(FLAGS.workdir, list(plan))
  if not runs:
    raise app.UsageError(f'no finished run in {FLAGS.workdir} (runs: {list(plan)})')
  other = finished_runs(FLAGS.compare) if FLAGS.compare else None
  pairs = []
  for pair in FLAGS.differences:
    if pair.count(':') != 1:
      raise app.UsageError(f'--differences entry {pair!r}: expected A:B (two metric paths)')
    pairs.append(tuple(pair.split(':')))
  result = {'config': FLAGS.config, 'flags': extra, **aggregate(runs, other, pairs)}
  with open(os.path.join(FLAGS.workdir, 'sweep.json'), 'w') as f:
    json.dump(result, f, indent=1)
  for key, s in result['metrics'].items():
    print(f'{key}: {s["mean"]:.4f} +- {s["std"]:.4f} (n={s["n"]})')
  for key, s in result.get('differences', {}).items():
    print(f'{key}: {s["mean"]:+.4f} +- {s["se"]:.4f} (se, n={s["n"]})')
  for key, s in result.get('paired_differences', {}).items():
    print(f'diff {key}: {s["mean"]:+.4f} +- {s["se"]:.4f} (se, n={s["n"]})')


if __name__ == '__main__':
  app.run(main)
