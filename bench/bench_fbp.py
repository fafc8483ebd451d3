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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from absl import app, flags
from ml_collections import config_flags

from bench.common import bench_stage, matmul_peak_gflops, print_header, print_row
from faceflax import xla_setup
from faceflax.tasks import fbp_kd

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/fbp_kd.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 10, 'Timed steps per stage (after one warm-up step).')
flags.DEFINE_integer('pipeline_batches', 30, 'Batches timed for the input pipeline.')


def main(argv):
  del argv
  xla_setup.configure()
  config = FLAGS.config
  peak = matmul_peak_gflops()
  with tempfile.TemporaryDirectory() as workdir:
    with config.unlocked():
      config.teacher.finetune.from_pretrained = False
      config.student.kd.from_pretrained = False
    job = fbp_kd.Job(config, workdir)
    mesh = job.mesh
    teacher_params = jax.jit(job.stage('teacher_finetune').init_fn)(jax.random.key(0))['params']
    job.provide('teacher_finetune', {'params': teacher_params})
    print_header()
    for name in ('teacher_pretrain', 'teacher_finetune', 'student_pretrain', 'student_kd'):
      stage = job.stage(name)
      print_row(name, stage, bench_stage(stage, mesh, FLAGS.steps, FLAGS.pipeline_batches), peak)


if __name__ == '__main__':
  app.run(main)
