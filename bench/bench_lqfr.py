"""Benchmarks the low-quality face recognition train steps and input pipeline.

Prints, for the teacher's ArcFace step and the student's KD step (teacher
forward on the HQ view + student forward/backward on the degraded view + ArcFace,
output KD and attention KD, one XLA graph): images/s (median of timed steps),
XLA compile seconds, achieved GFLOP/s from XLA's cost analysis and its ratio to
the fp32 matmul peak measured in the same run; and the input pipeline's images/s
(decode, degrade, augment) against what the step consumes.

  python bench/bench_lqfr.py                                  # default preset
  python bench/bench_lqfr.py --config=configs/lqfr_kd.py:celeba --steps=20
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from absl import app, flags
from ml_collections import config_flags

from bench.common import bench_stage, matmul_peak_gflops, print_header, print_row
from faceflax import xla_setup
from faceflax.tasks import lqfr_kd

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/lqfr_kd.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 10, 'Timed steps per stage (after one warm-up step).')
flags.DEFINE_integer('pipeline_batches', 30, 'Batches timed for the input pipeline.')


def main(argv):
  del argv
  xla_setup.configure()
  peak = matmul_peak_gflops()
  with tempfile.TemporaryDirectory() as workdir:
    config = lqfr_kd.with_data_dir(FLAGS.config, workdir)
    job = lqfr_kd.Job(config, workdir)
    teacher = job.stage('teacher')
    state = jax.jit(teacher.init_fn)(jax.random.key(0))  # an untrained teacher costs the same
    job.provide('teacher', state)
    print_header()
    for name in ('teacher', 'student_both'):
      stage = job.stage(name)
      print_row(name, stage, bench_stage(stage, job.mesh, FLAGS.steps, FLAGS.pipeline_batches),
                peak)


if __name__ == '__main__':
  app.run(main)
