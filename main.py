"""faceflax: train or evaluate a face-analysis method from a config file.

  python main.py --config=configs/fbp_kd.py --workdir=/tmp/fbp_kd
  python main.py --config=configs/fbp_kd.py:test --workdir=/tmp/t --config.seed=1
  python main.py --mode=eval --config=configs/fbp_kd.py --workdir=W --config.data.dir=DIR
"""
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (path[:preset]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train: run the config\'s stages; '
                  'eval: score the trained models of --workdir on --config.data.dir.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from faceflax import app as faceflax_app  # after flag parsing: keeps --help fast
  faceflax_app.run(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == '__main__':
  app.run(main)
