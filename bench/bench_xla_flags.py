"""Compares XLA flag sets on the real train steps: median img/s and its ratio to no flags.

XLA reads its flags once per process, so every (flag set, config) pair runs
``bench_steps.py`` in a fresh process; the pairs are interleaved over --rounds so that a
machine whose speed drifts (a shared VM, thermal limits) biases no flag set. Each cell is
the median over the rounds of the step's img/s (itself the median of --steps steps).

  python bench/bench_xla_flags.py --rounds=3
  python bench/bench_xla_flags.py --flag_sets=base,ynn --configs=configs/age_mtmsa.py:utkface

A flag set is a name from FLAG_SETS or raw XLA flags (``--xla_...``); 'base' is none.
"""
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # pylint: disable=g-import-not-at-top
from faceflax import xla_setup  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['configs/fbp_kd.py:scut@teacher_finetune+student_kd',
                              'configs/lqfr_kd.py:celeba@teacher+student_both',
                              'configs/age_mtmsa.py:utkface'],
                  'Configs to time, each optionally @stage+stage (default: the trained ones).')
flags.DEFINE_list('flag_sets', ['base', 'faceflax', 'ynn_dot', 'ynn_reduce', 'ynn_all'],
                  'Names in FLAG_SETS, or raw XLA flags separated by spaces.')
flags.DEFINE_integer('rounds', 2, 'Interleaved repetitions of every (flag set, config).')
flags.DEFINE_integer('steps', 8, 'Timed steps per stage and run.')
flags.DEFINE_integer('num_classes', 158, 'lqfr_kd identities (the celeba preset: 158).')

FLAG_SETS = {
    'base': '',
    'faceflax': xla_setup.CPU_FLAGS,  # what faceflax sets on CPU
    'ynn_dot': '--xla_cpu_experimental_ynn_fusion_type=dot',
    'ynn_reduce': '--xla_cpu_experimental_ynn_fusion_type=reduce',
    'ynn_all': '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce',
    'xnn_greedy': '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
    'onednn': '--xla_cpu_use_onednn=true',
    # cheaper LLVM for the step's compile (start-up), on top of faceflax's flags
    'llvm_cheap': xla_setup.CPU_FLAGS + ' --xla_llvm_disable_expensive_passes=true',
    'llvm_O2': xla_setup.CPU_FLAGS + ' --xla_backend_optimization_level=2',
}


def run_once(config: str, xla_flags: str) -> dict:
  bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench_steps.py')
  env = dict(XLA_FLAGS=xla_flags, FACEFLAX_XLA_CPU_FLAGS='off',
             FACEFLAX_COMPILATION_CACHE='off')  # every run compiles: compile s is comparable
  config, _, stages = config.partition('@')
  args = [bench, f'--config={config}', f'--steps={FLAGS.steps}',
          f'--num_classes={FLAGS.num_classes}']
  if stages:
    args.append(f'--stages={stages.replace("+", ",")}')
  return common.run_fresh(args, env, f'{config} with XLA_FLAGS={xla_flags!r}')


def main(argv):
  del argv
  sets = {s: FLAG_SETS.get(s, s) for s in FLAGS.flag_sets}
  runs = {}  # (config, flag set) -> [rows of each round]
  for r in range(FLAGS.rounds):
    for config in FLAGS.configs:
      for name, xla_flags in sets.items():
        runs.setdefault((config, name), []).append(run_once(config, xla_flags))
        print(f'round {r + 1}/{FLAGS.rounds} {config} {name} done', file=sys.stderr, flush=True)
  base = next(iter(sets))
  print(f'img/s: median of {FLAGS.rounds} interleaved runs; ratio to {base!r}; '
        'compile s: median')
  for name, xla_flags in sets.items():
    print(f'  {name}: {xla_flags or "(no flags)"}')
  print(f'{"config / stage":44s} ' + ' '.join(f'{n:>18s}' for n in sets))
  for config in FLAGS.configs:
    for stage in runs[(config, base)][0]:
      def median(name, key):
        return float(np.median([rows[stage][key] for rows in runs[(config, name)]]))
      cells = [f'{median(n, "img_s"):7.1f} x{median(n, "img_s") / median(base, "img_s"):4.2f} '
               f'{median(n, "compile_s"):4.0f}s' for n in sets]
      print(f'{config + " " + stage:44s} ' + ' '.join(f'{c:>18s}' for c in cells))


if __name__ == '__main__':
  app.run(main)
