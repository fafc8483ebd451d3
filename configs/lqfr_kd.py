"""Low-quality face recognition: ResNeXt-CBAM teacher on HQ faces -> students on degraded faces.

Presets (``--config=configs/lqfr_kd.py:<preset>``):
  (default)  built-in synthetic identities, CPU-sized ResNeXt-CBAM, the teacher and the
             student with both KD terms; < 15 min on 2 CPU cores
  celeba     ../shared/data/celeba_id identities, the full ablation table (5 students
             and the external teacher); < 60 min on 2 CPU cores
  celeba_kd  a pretrained face embedding (dlib's ResNet, ``pip install -e .[teachers]``)
             distilled into the student on degraded views of every train face of
             celeba_id, utkface and scut_fbp5500; ~45 min on 2 CPU cores with the
             teacher's embedding pass (~21 of them; cached: a second run skips it)
  paper      ResNeXt-50 32x4d, 512-d embeddings, paper-length schedules, for accelerators;
             CASIA-WebFace's insightface pack, AgeDB-30 / CPLFW at HQ, x2, x4, x8
  test       tiny, seconds; used by the tests

Students are stages named ``student_<variant>``: nokd (ArcFace only), output (+ output
KD), attention (+ attention-map KD), both, external (output KD from precomputed
embeddings of a non-faceflax teacher, ``data.external_teacher``, or such a teacher run
by the project: ``faceflax.teachers``).
"""
import functools

import ml_collections

from faceflax import config_defaults

SHARED = '../shared/data'


optimizer = functools.partial(config_defaults.optimizer, grad_clip=5.0)


def get_config(preset: str = ''):
  c = ml_collections.ConfigDict()
  c.task = 'lqfr_kd'
  c.seed = 0
  c.stages = 'teacher,student_both,evaluate'
  c.reuse_from = ''  # another workdir whose finished stages may be reused (ablations)
  c.eval_batch_size = 128

  c.data = dict(
      dir='',  # '' = built-in synthetic identities; or folder format (images/, labels.csv, pairs)
      identity_column='identity',
      train_split='train',
      drop_noisy=True,             # rows with id_noisy=1 (likely mislabelled) are not trained on
      eval_pairs='pairs_val.csv',  # verification pairs (file_a, file_b, same) in data.dir
      # student_external's teacher: a .npy in dir (one embedding per labels.csv row) or a
      # teacher of faceflax.teachers ('dlib_resnet'), run on each train face's high-quality
      # view and cached in teacher_cache ('' = <workdir>/../teacher_cache, shared by a
      # sweep's runs), as the mean of the face's and its mirror image's embeddings.
      external_teacher='teacher_dlib128.npy',
      teacher_cache='',
      teacher_mirror_average=True,
      teacher_workers=0,  # processes computing its embeddings (0: one per CPU)
      # More faces for student_external (a teacher the project runs): folders' train
      # splits, without identities (no ArcFace term on them).
      unlabeled='',
      synthetic=dict(num_train_ids=120, num_val_ids=40, per_id=10, num_pairs=1200, size=64,
                     seed=0),
      image_size=64,               # CPU presets; faces are 112 px chips, the paper uses 112
      train_pp='flip_lr|value_range(-1, 1)',
      eval_pp='value_range(-1, 1)',  # evaluation, verification and prediction (after any degrade)
      # The student's view: the same face degraded on the fly; the teacher sees 'image'.
      degrade='degrade(resolution=(14, 28, 56, 64), blur=(0.5, 1.5), blur_prob=0.3, '
              'noise=(2.0, 8.0), noise_prob=0.3, jpeg=(30, 90), jpeg_prob=0.3)',
  )
  # Verification qualities: 'hq', the side (px) faces are downsampled to and back, or 'x2',
# 'x4', ...: blurred (sigma factor/2) and bicubic-downsampled by the factor, then back.
  c.eval = dict(qualities='hq,56,28,14', num_folds=10, far=1e-3)
  c.eval.partial = False  # --mode=eval: True scores the models that load when another's
                          # checkpoints are unreadable (else that is an error)

  model = dict(variant='small', attention=True, dropout=0.0)
  c.teacher = dict(model=dict(model), train=optimizer(600, 32, 2e-3, 50),
                   arcface=dict(scale=32.0, margin=0.5))
  c.student = dict(
      model=dict(model, variant='student'),
      train=optimizer(600, 32, 2e-3, 50),
      arcface=dict(scale=32.0, margin=0.5),
      kd=dict(alpha=1.0,           # output KD weight
              output='embedding',  # 'embedding' (cosine to the teacher's) or 'logits' (KL, T)
              temperature=4.0,
              beta=10.0,           # attention-map KD weight
              arcface=1.0,         # ArcFace's weight beside the KD terms (student_nokd: 1)
              relational=0.0,      # embedding KD: + this x the batch's pairwise cosines' MSE
              external_centre=True,  # student_external's targets less their mean (README)
              maps='channel,spatial'),
  )
  c.train = dict(log_every=50, checkpoint_every=500, keep_checkpoints=2)
  config_defaults.add_run_settings(c)

  if preset == 'celeba':
    c.data.dir = f'{SHARED}/celeba_id'
    # 158 identities: with flips only the teacher over-fits them (99.9% train accuracy, HQ
    # verification 75.1%, below every student). Crops, colour jitter and head dropout: 80.0%.
    c.data.train_pp = ('random_resized_crop(64, scale=(0.8, 1.0))|flip_lr|'
                       'color_jitter(0.2, 0.2, 0.2)|value_range(-1, 1)')
    c.teacher.model.dropout = 0.2
    c.teacher.train.update(steps=1000, batch_size=64, warmup_steps=100)
    c.student.train.update(steps=500, batch_size=64, warmup_steps=50)
    c.stages = ('teacher,student_nokd,student_output,student_attention,student_both,'
                'student_external,evaluate')
  elif preset == 'celeba_kd':
    # A strong teacher that sees the clean face, a student that sees it degraded (issue 24).
    c.data.dir = f'{SHARED}/celeba_id'
    c.data.external_teacher = 'dlib_resnet'
    c.data.unlabeled = f'{SHARED}/utkface,{SHARED}/scut_fbp5500'
    # No crops: the student sees the whole chip the teacher saw (flips: its target is the
    # mirror average).
    c.data.train_pp = 'flip_lr|value_range(-1, 1)'
    c.student.model.embed_dim = 128  # the teacher's width: no projector
    c.student.train.update(steps=3000, batch_size=64, warmup_steps=100)
    c.student.kd.arcface = 0.0  # the teacher's embedding alone (ArcFace: README)
    # The ArcFace-only student of the README's table: --config.stages=student_nokd,...
    c.stages = 'student_external,evaluate'
  elif preset == 'paper':
    # CASIA-WebFace as insightface packs it (train.rec/.idx, 10,575 identities, 112 px, with
    # agedb_30.bin and cplfw.bin beside it), indexed once by `python -m faceflax.data.prepare`
    # and streamed from train.rec (README "Data at scale"). Override to where the pack is.
    c.data.dir = '/path/to/faces_webface_112x112'
    c.data.eval_pairs = 'agedb_30.bin,cplfw.bin'
    c.eval.qualities = 'hq,x2,x4,x8'  # the paper's protocol: blur, bicubic down by 2/4/8, back
    c.data.image_size = c.data.synthetic.size = 112
    c.data.degrade = c.data.degrade.replace('56, 64)', '56, 112)')
    c.teacher.model.update(variant='resnext50_32x4d')
    c.student.model.update(variant='resnext50_32x4d')
    c.train.precision = 'auto'  # bf16 on accelerators, fp32 on CPU
    for opt in (c.teacher.train, c.student.train):
      opt.update(steps=100_000, batch_size=512, lr=1e-3, warmup_steps=2000)
    c.teacher.arcface.scale = c.student.arcface.scale = 64.0
    c.train.update(log_every=100, checkpoint_every=5000)
  elif preset == 'test':
    c.data.image_size = 32
    c.data.synthetic.update(num_train_ids=6, num_val_ids=4, per_id=4, num_pairs=40, size=32)
    c.data.degrade = 'degrade(resolution=(8, 16, 32))'
    c.eval.qualities = 'hq,8'
    c.teacher.model.variant = c.student.model.variant = 'test'
    for opt in (c.teacher.train, c.student.train):
      opt.update(steps=4, batch_size=16, warmup_steps=1)
    c.eval_batch_size = 16
    c.train.update(log_every=2, checkpoint_every=2)
  elif preset:
    raise ValueError(f'unknown preset {preset!r} for lqfr_kd; known: celeba, celeba_kd, paper, test')
  return c
