"""Benchmarks the face-prior pretraining step and its input pipeline.

Prints, for the full step (masked encoder, decoder, region head, the unmasked
encoder pass that gives the component targets; one XLA graph) and for the
plain-MAE step of the same model (pixel task only, the ablation it is compared
with): images/s (median of timed steps), XLA compile seconds, achieved GFLOP/s
from XLA's cost analysis and its ratio to the fp32 matmul peak measured in the
same run; and the input pipeline's images/s (augmentation and region-map
rasterisation of the cached faces) against what the step consumes.

  python bench/bench_face_prior.py
  python bench/bench_face_prior.py --steps=20
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from bench.common import bench_stage, matmul_peak_gflops, print_header, print_row
from faceflax import xla_setup
from faceflax.tasks import face_prior

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/face_prior.py', 'Config to benchmark.')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (after one warm-up step).')
flags.DEFINE_integer('pipeline_batches', 20, 'Batches timed for the input pipeline.')


def main(argv):
  del argv
  xla_setup.configure()
  peak = matmul_peak_gflops()
  plain = FLAGS.config.copy_and_resolve_references()
  plain.prior.update(patch_weight=0.0, component_weight=0.0)
  with tempfile.TemporaryDirectory() as workdir:
    print_header()
    for name, config in (('face-prior step', FLAGS.config), ('plain MAE step', plain)):
      job = face_prior.Job(config, workdir)
      stage = job.stage('pretrain')
      print_row(name, stage, bench_stage(stage, job.mesh, FLAGS.steps, FLAGS.pipeline_batches),
                peak)


if __name__ == '__main__':
  app.run(main)
