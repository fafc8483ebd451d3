"""Regenerates the README's report pictures, docs/reports/*.png, from tiny runs on drawn faces.

Only the package's drawn faces (faceflax/data/synthetic.py) appear: never a real dataset's
faces (their licences forbid copies in the repository). The runs are the tests' ``:test``
presets at 64 px with 60 steps per stage, so the pictures show what each report looks like,
not a good model. From the project root (a few minutes on 2 CPU cores):

  python docs/make_report_pictures.py [--workdir=DIR]   # DIR keeps the runs (default: temporary)

Plots without faces (scatter, confusion matrix, ROC) may instead come from real-data runs'
``--mode=eval`` reports: ``--plots_from=fbp_kd=W1,age_mtmsa=W2,lqfr_kd=W3`` (README says which).
"""
import csv
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app as absl_app, flags
from PIL import Image

from faceflax import app
from faceflax.data import synthetic
from tests.configs_for_tests import load

OUT = os.path.join(REPO, 'docs', 'reports')
SIZE = 64
MAX_BYTES = 60_000
flags.DEFINE_string('workdir', '', 'Where the runs go (default: a temporary folder).')
flags.DEFINE_string('plots_from', '', 'task=workdir,...: trained real-data workdirs whose '
                    '--mode=eval plots (never face pictures) replace the drawn-face ones.')

# README picture -> (run, the report it copies)
PICTURES = {
    'mae_reconstruction': ('fbp_kd', 'teacher_pretrain_reconstruction'),
    'scatter': ('age_mtmsa', 'eval_age_scatter'),
    'roc': ('lqfr_kd', 'eval_teacher_roc'),
    'cbam_attention': ('lqfr_kd', 'eval_teacher_cbam_attention'),
    'msa_attention': ('age_mtmsa', 'eval_msa_attention'),
    'confusion': ('age_mtmsa', 'eval_race_confusion'),
}


def fbp_config(workdir):
  del workdir
  c = load('fbp_kd', 'test')
  c.data.image_size = c.data.synthetic.size = SIZE
  c.data.synthetic.update(num_train=256, num_val=64, num_test=64)
  c.stages = 'teacher_pretrain'  # its last logging step writes the reconstruction
  c.teacher.pretrain.update(steps=60, batch_size=32)
  c.train.update(image_every=60, log_every=10, checkpoint_every=60)
  return c


def lqfr_config(workdir):
  del workdir
  c = load('lqfr_kd', 'test')
  c.data.image_size = c.data.synthetic.size = SIZE
  c.data.synthetic.update(num_train_ids=24, num_val_ids=12, per_id=6, num_pairs=200)
  c.data.degrade = 'degrade(resolution=(8, 16, 32, 64))'
  c.stages = 'teacher,evaluate'
  c.teacher.train.update(steps=60)
  c.train.update(log_every=10, checkpoint_every=60)
  return c


def age_config(workdir):
  """Drawn faces with an 'age' from two visible traits (eye size, smile) and random gender
  and race labels: the pictures show each report's layout."""
  root = os.path.join(workdir, 'age_faces')
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  images, traits = synthetic.make_faces(192, size=SIZE, seed=0)
  rng = np.random.default_rng(0)
  rows = []
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(root, 'images', f'{i:03d}.png'))
    age = int(np.clip(40 + 12 * traits['eye_size'][i] + 12 * traits['smile'][i], 1, 90))
    rows.append((f'{i:03d}.png', age, rng.integers(2), rng.integers(5),
                 'train' if i < 128 else 'val'))
  with open(os.path.join(root, 'labels.csv'), 'w', newline='') as f:
    csv.writer(f).writerows([('filename', 'age', 'gender', 'race', 'split'), *rows])
  c = load('age_mtmsa', 'test')
  c.data.update(dir=root, image_size=SIZE)
  c.train.update(steps=60, log_every=10, checkpoint_every=60)
  return c


# Plots without faces, from a real-data workdir's --mode=eval (README lists the commands).
REAL_PLOTS = {
    'scatter': ('fbp_kd', 'eval_scut_fbp5500_teacher_scatter'),
    'confusion': ('age_mtmsa', 'eval_utkface_race_confusion'),
    'roc': ('lqfr_kd', 'eval_celeba_id_teacher_roc'),
}

CONFIGS = {'fbp_kd': fbp_config, 'lqfr_kd': lqfr_config, 'age_mtmsa': age_config}


def shrink(src: str, dst: str) -> int:
  """Copies a report PNG, halved (and palette-quantised) until it is under MAX_BYTES."""
  image = Image.open(src).convert('RGB')
  while True:
    image.quantize(128).save(dst, optimize=True)
    if os.path.getsize(dst) < MAX_BYTES or image.width < 64:
      return os.path.getsize(dst)
    image = image.resize((image.width // 2, image.height // 2), Image.BILINEAR)


def main(argv):
  del argv
  root = flags.FLAGS.workdir or tempfile.mkdtemp(prefix='report_pictures_')
  os.makedirs(OUT, exist_ok=True)
  for run, make_config in CONFIGS.items():
    workdir = os.path.join(root, run)
    os.makedirs(workdir, exist_ok=True)
    app.run(make_config(root), workdir)
  real = dict(item.split('=', 1) for item in flags.FLAGS.plots_from.split(',') if item)
  for picture, (run, report) in PICTURES.items():
    src = os.path.join(root, run, 'reports', f'{report}.png')
    if picture in REAL_PLOTS and REAL_PLOTS[picture][0] in real:
      run, report = REAL_PLOTS[picture]
      src = os.path.join(real[run], 'reports', f'{report}.png')
    size = shrink(src, os.path.join(OUT, f'{picture}.png'))
    print(f'docs/reports/{picture}.png  {size / 1000:.1f} KB  (from {run}: {report}.png)')


if __name__ == '__main__':
  absl_app.run(main)
