"""Benchmarks the FBP train steps and input pipeline on this machine.

Prints, for each stage (teacher pretraining, teacher fine-tuning, student KD):
images/s (median over timed steps), XLA compile seconds, achieved GFLOP/s from
XLA's cost analysis and its ratio to the fp32 matmul peak measured in the same
run; and the input pipeline's images/s against what the step consumes.

  python bench/bench_fbp.py                       # default preset (synthetic faces)
  python bench/bench_fbp.py --config.data.dir=../shared/data/scut_fbp5500 --steps=20
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from faceflax.tasks import fbp_kd
from faceflax.train import loop, mesh as mesh_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/fbp_kd.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 10, 'Timed steps per stage (after one warm-up step).')
flags.DEFINE_integer('pipeline_batches', 30, 'Batches timed for the input pipeline.')


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
  """fp32 matmul throughput of this machine, the yardstick for the steps."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / np.median(times) / 1e9


def step_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def bench_stage(stage: loop.Stage, mesh, steps: int, pipeline_batches: int) -> dict:
  batches = stage.batches(start_step=0)
  host = next(batches)
  batch = mesh_lib.put_batch(host, mesh)
  state = jax.jit(stage.init_fn, out_shardings=mesh_lib.replicated(mesh))(jax.random.key(0))
  update, compile_s = loop.compile_update(stage, mesh, batch, jax.eval_shape(lambda s: s, state))
  flops = step_flops(update)
  state, m = update(state, batch, jax.random.key(0), *stage.consts)  # warm-up
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = update(state, batch, jax.random.key(i), *stage.consts)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  t = time.perf_counter()
  for _ in range(pipeline_batches):
    next(batches)
  pipe_img_s = pipeline_batches * stage.batch_size / (time.perf_counter() - t)
  return {'img_s': stage.batch_size / step_s, 'compile_s': compile_s,
          'gflops_s': flops / step_s / 1e9, 'pipeline_img_s': pipe_img_s}


def main(argv):
  del argv
  config = FLAGS.config
  peak = matmul_peak_gflops()
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; '
        f'fp32 matmul peak (2048^3, median of 10): {peak:.1f} GFLOP/s')
  with tempfile.TemporaryDirectory() as workdir:
    with config.unlocked():
      config.teacher.finetune.from_pretrained = False
      config.student.kd.from_pretrained = False
    job = fbp_kd.Job(config, workdir)
    mesh = job.mesh
    teacher_params = jax.jit(job.stage('teacher_finetune').init_fn)(jax.random.key(0))['params']
    job.provide('teacher_finetune', teacher_params)
    print(f'{"stage":18s} {"batch":>5s} {"img/s":>8s} {"compile s":>9s} {"GFLOP/s":>8s} '
          f'{"% peak":>7s} {"pipeline img/s":>14s} {"pipe/step":>9s}')
    for name in ('teacher_pretrain', 'teacher_finetune', 'student_pretrain', 'student_kd'):
      r = bench_stage(job.stage(name), mesh, FLAGS.steps, FLAGS.pipeline_batches)
      print(f'{name:18s} {job.stage(name).batch_size:5d} {r["img_s"]:8.1f} {r["compile_s"]:9.1f} '
            f'{r["gflops_s"]:8.1f} {100 * r["gflops_s"] / peak:6.1f}% {r["pipeline_img_s"]:14.1f} '
            f'{r["pipeline_img_s"] / r["img_s"]:8.1f}x')


if __name__ == '__main__':
  app.run(main)
