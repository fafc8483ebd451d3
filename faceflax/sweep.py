"""Runs one config over several seeds and aggregates the runs' results into mean +- std.

  python -m faceflax.sweep --config=configs/age_mtmsa.py:utkface --workdir=W --seeds=0,1,2 \
      [--compare=W_OTHER] [-- --config.model.msa_stages=()]

Each seed trains in ``W/seed<N>`` through ``main.py`` (``--config.seed=N``, the flags after
``--`` appended); a run whose ``results.json`` exists is not redone, and an interrupted one
resumes from its checkpoints like any run, so rerunning the command finishes the sweep.
``W/sweep.json`` then holds, for every number in the runs' ``results.json``, its per-seed
values, mean and sample std; with ``--compare`` (another sweep's workdir over the same
seeds) also the paired difference (this - other) per seed, its mean, std and standard
error (std / sqrt(n)).
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
flags.DEFINE_list('seeds', ['0', '1', '2'], 'seeds to run')
flags.DEFINE_string('compare', '', 'another sweep workdir: paired differences per seed')
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


def aggregate(runs: dict, other: dict | None = None) -> dict:
  """``runs``: {seed: results}; the metrics every run has, summarised over the seeds, and
  with ``other`` ({seed: results} of another sweep) the paired differences."""
  per_run = {seed: numbers(r) for seed, r in runs.items()}
  seeds = sorted(per_run)
  keys = sorted(set.intersection(*(set(v) for v in per_run.values()))) if per_run else []
  out = {'seeds': seeds, 'metrics': {k: summary([per_run[s][k] for s in seeds]) for k in keys}}
  if other is not None:
    theirs = {seed: numbers(r) for seed, r in other.items()}
    paired = [s for s in seeds if s in theirs]
    if not paired:
      raise ValueError(f'--compare: no seed in common (this sweep: {seeds}, '
                       f'the other: {sorted(theirs)})')
    out['paired_seeds'] = paired
    out['paired_differences'] = {
        k: summary([per_run[s][k] - theirs[s][k] for s in paired])
        for k in keys if all(k in theirs[s] for s in paired)}
  return out


def run_dir(workdir: str, seed) -> str:
  return os.path.join(workdir, f'seed{seed}')


def finished_runs(workdir: str, seeds) -> dict:
  runs = {}
  for seed in seeds:
    path = os.path.join(run_dir(workdir, seed), 'results.json')
    if os.path.isfile(path):
      with open(path) as f:
        runs[int(seed)] = json.load(f)
  return runs


def finished_sweep(workdir: str) -> dict:
  """{seed: results} of every finished run below ``workdir``."""
  seeds = [name[4:] for name in sorted(os.listdir(workdir))
           if name.startswith('seed') and name[4:].isdigit()]
  return finished_runs(workdir, seeds)


def main(argv):
  extra = argv[1:]
  if not FLAGS.workdir or not FLAGS.config:
    raise app.UsageError('--config and --workdir are required')
  seeds = [int(s) for s in FLAGS.seeds]
  if not FLAGS.aggregate_only:
    main_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'main.py')
    for seed in seeds:
      if os.path.isfile(os.path.join(run_dir(FLAGS.workdir, seed), 'results.json')):
        continue  # finished earlier
      subprocess.run([sys.executable, main_py, f'--config={FLAGS.config}',
                      f'--workdir={run_dir(FLAGS.workdir, seed)}', f'--config.seed={seed}',
                      *extra], check=True)
  runs = finished_runs(FLAGS.workdir, seeds)
  other = finished_sweep(FLAGS.compare) if FLAGS.compare else None
  result = {'config': FLAGS.config, 'flags': extra, **aggregate(runs, other)}
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, 'sweep.json'), 'w') as f:
    json.dump(result, f, indent=1)
  for key, s in result['metrics'].items():
    print(f'{key}: {s["mean"]:.4f} +- {s["std"]:.4f} (n={s["n"]})')
  for key, s in result.get('paired_differences', {}).items():
    print(f'diff {key}: {s["mean"]:+.4f} +- {s["se"]:.4f} (se, n={s["n"]})')


if __name__ == '__main__':
  app.run(main)
