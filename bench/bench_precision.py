"""fp32 vs bf16 compute (``config.train.precision``): train-step images/s on this machine.

For each FBP stage: the median step time over the timed steps in fp32 and in
bf16 (parameters and optimizer state fp32 in both), and their ratio.

  python bench/bench_precision.py --steps=5
  python bench/bench_precision.py --stages=teacher_finetune --config=configs/fbp_kd.py:test
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from absl import app, flags
from ml_collections import config_flags

from bench.common import bench_stage
from faceflax import xla_setup
from faceflax.tasks import fbp_kd

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/fbp_kd.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 10, 'Timed steps per stage and precision (after one warm-up).')
flags.DEFINE_string('stages', 'teacher_pretrain,student_kd', 'Comma-separated FBP stages.')


def run_precision(precision: str, workdir: str) -> dict:
  config = FLAGS.config.copy_and_resolve_references()
  config.train.precision = precision
  config.teacher.finetune.from_pretrained = config.student.kd.from_pretrained = False
  job = fbp_kd.Job(config, workdir)
  teacher = jax.jit(job.stage('teacher_finetune').init_fn)(jax.random.key(0))['params']
  job.provide('teacher_finetune', {'params': teacher})
  return {name: (job.stage(name), bench_stage(job.stage(name), job.mesh, FLAGS.steps, 1))
          for name in FLAGS.stages.split(',')}


def main(argv):
  del argv
  xla_setup.configure()
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}')
  with tempfile.TemporaryDirectory() as workdir:
    fp32, bf16 = run_precision('fp32', workdir), run_precision('bf16', workdir)
  print(f'{"stage":18s} {"batch":>5s} {"fp32 img/s":>10s} {"bf16 img/s":>10s} {"bf16/fp32":>9s} '
        f'{"compile s fp32 / bf16":>22s}')
  for name, (stage, a) in fp32.items():
    b = bf16[name][1]
    print(f'{name:18s} {stage.batch_size:5d} {a["img_s"]:10.1f} {b["img_s"]:10.1f} '
          f'{b["img_s"] / a["img_s"]:8.2f}x {a["compile_s"]:10.1f} / {b["compile_s"]:.1f}')


if __name__ == '__main__':
  app.run(main)
