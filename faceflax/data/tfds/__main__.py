"""`python -m faceflax.data.tfds NAME --manual_dir=DIR [tfds build flags]`.

Runs the `tfds build` command itself with the faceflax builders registered, storing
the dataset as array_record unless ``--file_format`` says otherwise: training reads its
records by index (``--config.data.tfds=NAME``, README "Data at scale"). The
`tfds` script of tfds 4.9.10 cannot start without apache-beam, which it imports
for other commands (tensorflow/datasets#5463); this entry point does not need it.
"""

import sys

import simple_parsing
from tensorflow_datasets.scripts.cli import build

import faceflax.data.tfds  # pylint: disable=unused-import  # Registers the builders.


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith('--file_format') for a in argv):
    argv.append('--file_format=array_record')
  simple_parsing.parse(build.Args, prog='python -m faceflax.data.tfds', args=argv).execute()


if __name__ == '__main__':
  main()
