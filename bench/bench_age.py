"""Benchmarks the age-estimation train step and input pipeline.

Prints, for the config's multi-task step (ResNet-MSA forward/backward, the age loss
and the gender / race cross-entropies, BatchNorm updates, one XLA graph) and for the
same step without the MSA modules (the plain-ResNet ablation): images/s (median of
timed steps), XLA compile seconds, achieved GFLOP/s from XLA's cost analysis and its
ratio to the fp32 matmul peak measured in the same run; and the input pipeline's
images/s (augmentation of the cached faces) against what the step consumes.

  python bench/bench_age.py                                      # default preset
  python bench/bench_age.py --config=configs/age_mtmsa.py:utkface --steps=20
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from bench.common import bench_stage, matmul_peak_gflops, print_header, print_row
from faceflax import xla_setup
from faceflax.tasks import age_mtmsa

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/age_mtmsa.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (after one warm-up step).')
flags.DEFINE_integer('pipeline_batches', 30, 'Batches timed for the input pipeline.')
flags.DEFINE_bool('plain', True, 'Also time the step without MSA modules.')


def main(argv):
  del argv
  xla_setup.configure()
  peak = matmul_peak_gflops()
  variants = {'train': FLAGS.config}
  if FLAGS.plain and FLAGS.config.model.msa_stages:
    plain = FLAGS.config.copy_and_resolve_references()
    plain.model.msa_stages = ()
    variants['train (no MSA)'] = plain
  with tempfile.TemporaryDirectory() as workdir:
    print_header()
    for name, config in variants.items():
      job = age_mtmsa.Job(config, workdir)
      stage = job.stage('train')
      print_row(name, stage, bench_stage(stage, job.mesh, FLAGS.steps, FLAGS.pipeline_batches),
                peak)


if __name__ == '__main__':
  app.run(main)
