"""faceflax: train or evaluate a face-analysis method from a config file.

  python main.py --config=configs/fbp_kd.py --workdir=/tmp/fbp_kd
  python main.py --config=configs/fbp_kd.py:test --workdir=/tmp/t --config.seed=1
  python main.py --mode=eval --config=configs/fbp_kd.py --workdir=W --config.data.dir=DIR
  python main.py --mode=predict --config=configs/fbp_kd.py --workdir=W --input=PHOTOS --output=out.csv
  python main.py --mode=verify --config=configs/lqfr_kd.py --workdir=W --input=a.jpg,b.jpg
  # one command per host (README "Running on a cluster"):
  python main.py --config=... --workdir=SHARED_W --coordinator_address=HOST0:1234 \
      --num_processes=N --process_id=I

Exit status: 0 done; 1 bad input (data, config, workdir, checkpoint: one line saying what,
no traceback; -v 1 adds it); 2 bad flags; 75 (preemption.EXIT_CODE) stopped by SIGTERM /
SIGINT with the current step checkpointed: rerun the same command to resume exactly.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'verify'],
                  'train: run the config\'s stages; eval: score the trained models of --workdir '
                  'on --config.data.dir; predict: score the photos of --input -> --output CSV; '
                  'verify (lqfr_kd): similarity of the two faces of --input=a.jpg,b.jpg and the '
                  'decision at the validated threshold.')
flags.DEFINE_string('input', None, '--mode=predict: a photo or a folder of photos; '
                    '--mode=verify: two photos, a.jpg,b.jpg.')
flags.DEFINE_string('output', None, '--mode=predict: the CSV to write (embeddings: .npy beside it).')
flags.DEFINE_enum('align', 'auto', ['auto', 'none'],
                  'auto: detect and align the face of each photo (OpenCV Haar cascades); none: '
                  'the inputs are already aligned chips like the training data.')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'jax.distributed.initialize: auto = when a coordinator address is given or a '
                  'multi-task SLURM / Open MPI / GKE TPU job is detected; on = always (JAX '
                  'auto-detects the cluster); off = one process.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, reachable from every host '
                    '(default: env JAX_COORDINATOR_ADDRESS, else cluster auto-detection).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (default: env '
                     'JAX_NUM_PROCESSES, else cluster auto-detection).')
flags.DEFINE_integer('process_id', None, 'This process\'s id in 0..num_processes-1 (default: '
                     'env JAX_PROCESS_ID, else cluster auto-detection).')
flags.DEFINE_boolean('allow_config_change', False,
                     'train on in a --workdir that was trained with a config that differs in '
                     'what changes the models or their scores (refused by default; the earlier '
                     'results are kept as *.before-<time>.json); eval / predict / verify with '
                     'other preprocessing (image size, eval_pp) than the models trained with.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parsing, with an unknown ``--config.`` key named in one line (the flag, the key,
  the closest valid keys) instead of ml_collections' traceback."""
  try:
    return FLAGS(argv)
  except (KeyError, AttributeError):
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '')
    if not spec:
      raise
    from faceflax import config_checks
    message = config_checks.unknown_override(spec, argv)
    if not message:
      raise
    sys.stderr.write(f'FATAL config: {message}\n')
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from faceflax import distributed, xla_setup  # after flag parsing: keeps --help fast
  xla_setup.configure()  # before JAX starts a backend
  distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  from faceflax import app as faceflax_app
  from faceflax.train import preemption
  try:
    faceflax_app.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.input or '',
                     FLAGS.output or '', FLAGS.align, FLAGS.allow_config_change)
  except preemption.Preempted as e:
    logging.warning('%s', e)
    sys.exit(preemption.EXIT_CODE)
  except faceflax_app.expected_errors() as e:
    if FLAGS.verbosity >= 1:  # -v 1: the traceback as well
      raise
    # What is wrong with the input, in one line; a bug's traceback is not hidden (not caught).
    logging.error('%s: %s', type(e).__name__, e)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
