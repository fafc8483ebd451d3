"""Age estimation: ResNet with dilated multi-scale attention (MSA), age + gender + race heads.

Presets (``--config=configs/age_mtmsa.py:<preset>``):
  (default)  ../shared/data/utkface (train -> val), the 'small' ResNet-MSA at 80 px,
             1000 steps of 64 (~9 epochs); < 15 min on 2 CPU cores. There is no built-in
             synthetic age data: data.dir must exist (a missing one is an error naming
             it), so run from the project root or pass --config.data.dir=DIR
  utkface    the same data and model, 4500 steps of 64 (~41 epochs), aiming at val age
             MAE <= 6.0; the whole run <= 60 min on 2 CPU cores (measured step: 0.116
             GFLOPs/image forward, ~90 img/s with another training job on the cores)
  paper      ResNet34-MSA at 224 px, paper-length schedule, for accelerators; point
             data.dir / data.format at MORPH II or the full UTKFace release
  test       tiny, seconds; used by the tests

Data (``data.format``):
  folder   DIR/images/ + DIR/labels.csv: filename, age[, gender (0 male, 1 female),
           race (0-4, UTKFace codes), age_group (Adience 0-7), split]; an empty or -1
           gender / race / age_group is unknown and left out of that head's loss and score
  utkface  the official UTKFace release (labels from '[age]_[gender]_[race]_[date].jpg'
           names, any depth; splits 'train'/'val' by file-name hash; malformed names are
           skipped with a warning)
  morph    MORPH II from its CSV list; protocol 'random_80_20' (default); splits 'train'/'test'
  adience  Adience fold lists; protocol 'fold0'..'fold4' (default fold0); splits
           'train'/'test'; also scored by exact / one-off accuracy over the 8 age groups

Runs (from the project root):
  python main.py --config=configs/age_mtmsa.py:utkface --workdir=/work/runs/age_utkface
  # --mode=eval scores a workdir's model on any dataset -> W/eval_<folder name>.json
  python main.py --mode=eval --config=configs/age_mtmsa.py:utkface --workdir=W \\
      --config.data.dir=DIR --config.eval.split=test

Ablations are separate runs of the same preset with overrides (tuples are written as
Python literals and quoted for the shell; heads also accept 'age,gender'):
  plain ResNet, no MSA:   --config.model.msa_stages='()'
  MSA after stage 1 only: --config.model.msa_stages='(1,)'
  other dilation rates:   --config.model.msa_rates='(1,2,3)'
  age only (single task): --config.model.heads=age
  age + gender:           --config.model.heads=age,gender
  losses:                 --config.loss.age=dirac_gaussian | l1 | ce   (default kl)
  KL without the L1 term: --config.loss.l1_weight=0
e.g.
  python main.py --config=configs/age_mtmsa.py:utkface --workdir=/work/runs/age_plain \\
      --config.model.msa_stages='()'
"""
import functools

import ml_collections

from faceflax import config_defaults

SHARED = '../shared/data'


optimizer = functools.partial(config_defaults.optimizer, grad_clip=5.0)


def get_config(preset: str = ''):
  c = ml_collections.ConfigDict()
  c.task = 'age_mtmsa'
  c.seed = 0
  c.stages = 'train,evaluate'
  c.reuse_from = ''  # another workdir whose finished 'train' stage may be reused
  c.eval_batch_size = 128

  c.data = dict(
      dir=f'{SHARED}/utkface',  # relative to the working directory (the project root)
      format='folder',          # 'folder' | 'utkface' | 'morph' | 'adience'
      protocol='',              # morph: 'random_80_20'; adience: 'fold0'..'fold4'; '' = default
      train_split='train',
      eval_split='val',         # scored by the 'evaluate' stage
      image_size=80,            # faces are cached at this size once, then augmented
      train_pp='random_resized_crop({size}, scale=(0.8, 1.0))|flip_lr|'
               'color_jitter(0.2, 0.2, 0.2)|value_range(-1, 1)',
      eval_pp='value_range(-1, 1)',
  )
  c.model = dict(
      variant='small',          # resnet_msa.VARIANTS: resnet34, small, test
      msa_stages=(0, 1),        # trunk stages followed by an MSA module; () = plain ResNet
      msa_rates=(1, 2, 5),      # cascaded dilation rates inside each MSA
      heads=('age', 'gender', 'race'),  # 'age' is required
      max_age=116,              # age logits over the integer ages 0..max_age
      dropout=0.0,              # on the pooled features, before the heads
  )
  c.loss = dict(
      age='kl',                 # 'kl' | 'dirac_gaussian' | 'l1' | 'ce'
      sigma=2.0,                # years: spread of the Gaussian label distribution ('kl')
      l1_weight=1.0,            # 'kl' only: + L1 on the expected age (DLDL-v2)
      gender_weight=1.0,        # auxiliary cross-entropies, unknown labels masked out
      race_weight=1.0,
  )
  c.train = dict(optimizer(1000, 64, 2e-3, 100), log_every=50, checkpoint_every=500,
                 keep_checkpoints=2)
  config_defaults.add_run_settings(c)
  c.eval = dict(split='test')  # --mode=eval: scored split ('every row' if no split column)

  if preset == 'utkface':
    c.train.update(steps=4500, warmup_steps=200, checkpoint_every=1000)
  elif preset == 'paper':
    c.data.image_size = 224
    c.model.update(variant='resnet34', msa_stages=(1, 2), dropout=0.2)
    c.train.precision = 'auto'  # bf16 on accelerators, fp32 on CPU
    c.train.update(optimizer(60_000, 128, 1e-3, 2000), log_every=100, checkpoint_every=5000)
  elif preset == 'test':
    c.data.image_size = 32
    c.model.update(variant='test', msa_stages=(1,))
    c.train.update(steps=4, batch_size=16, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.eval_batch_size = 16
  elif preset:
    raise ValueError(f'unknown preset {preset!r} for age_mtmsa; known: utkface, paper, test')
  return c
