"""Cold init of each stage's state (``loop.jit_init``: trace, compile, run), compiled with
XLA's defaults against unoptimised (``loop.init_compiler_options``), each in a fresh process
without the compilation cache, the two interleaved over --rounds.

  python bench/bench_init.py --config=configs/age_mtmsa.py:utkface
  python bench/bench_init.py --config=configs/lqfr_kd.py:celeba --stages=teacher,student_both

Prints the median seconds per stage and mode and their ratio (README "Benchmarks", start-up).
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# bench_steps defines --config, --stages, --num_classes and --json
from bench import bench_steps, common  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 2, 'Interleaved repetitions of both modes.')
flags.DEFINE_enum('mode', '', ['', 'default', 'unoptimised'],
                  'Internal: time one mode in this process.')
MODES = ('default', 'unoptimised')


def time_inits(mode: str) -> dict:
  """{stage: (state elements, seconds)} of this process's cold inits."""
  import jax  # pylint: disable=g-import-not-at-top
  from faceflax import xla_setup  # pylint: disable=g-import-not-at-top
  from faceflax.train import loop, mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  xla_setup.configure()
  # 0: every state keeps XLA's defaults; unbounded: every state on CPU compiles unoptimised
  loop.CHEAP_INIT_MAX_ELEMENTS = 0 if mode == 'default' else float('inf')
  config = FLAGS.config
  mesh = mesh_lib.make_mesh(config.get('mesh'))
  make_state = lambda stage: jax.eval_shape(stage.init_fn, jax.random.key(0))
  rows = {}
  with tempfile.TemporaryDirectory() as workdir:
    stages = bench_steps.BUILDERS[config.task](config, workdir,
                                               bench_steps.stage_names(config), make_state)
    for name, stage in stages.items():
      rng = jax.random.key(0)
      t = time.perf_counter()
      init, shapes = loop.jit_init(stage, mesh, rng)
      jax.block_until_ready(init(rng))
      rows[name] = (sum(x.size for x in jax.tree.leaves(shapes)), time.perf_counter() - t)
  return rows


def run_child(mode: str) -> dict:
  args = [os.path.abspath(__file__), f'--mode={mode}',
          *[a for a in sys.argv[1:] if not a.startswith('--rounds')]]
  return common.run_fresh(args, {'FACEFLAX_COMPILATION_CACHE': 'off'}, f'{mode} init')


def main(argv):
  del argv
  if FLAGS.mode:
    with open(FLAGS.json, 'w') as f:  # bench_steps' --json: where the child writes
      json.dump(time_inits(FLAGS.mode), f)
    return
  runs = {m: [] for m in MODES}
  for _ in range(FLAGS.rounds):
    for mode in MODES:
      runs[mode].append(run_child(mode))
  print(f'init s (trace + compile + run), median of {FLAGS.rounds} fresh processes per mode')
  print(f'{"stage":20s} {"elements":>10s} {"default":>8s} {"unoptimised":>11s} {"ratio":>6s}')
  for name, (elements, _) in runs['default'][0].items():
    d, u = (float(np.median([r[name][1] for r in runs[m]])) for m in MODES)
    print(f'{name:20s} {elements / 1e6:9.1f}M {d:8.1f} {u:11.1f} {u / d:6.2f}')


if __name__ == '__main__':
  app.run(main)
