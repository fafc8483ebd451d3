"""Facial beauty prediction: multi-scale MAE teacher -> MAE student by KD.

Presets (``--config=configs/fbp_kd.py:<preset>``):
  (default)  built-in synthetic faces, 64 px, no MAE pretraining (see below); < 15 min on 2 CPU cores
  scut       ../shared/data/scut_fbp5500 (train -> val), the student pretrained also on the
             other ../shared/data faces; the whole job in < 60 min on 2 CPU cores
  paper      ViT-B teacher at 224 px, paper-length schedules, for accelerators
  test       tiny, seconds; used by the tests
"""
import functools

import ml_collections

from faceflax import config_defaults

SHARED = '../shared/data'


optimizer = functools.partial(config_defaults.optimizer, grad_clip=1.0)


def get_config(preset: str = ''):
  c = ml_collections.ConfigDict()
  c.task = 'fbp_kd'
  c.seed = 0
  c.stages = 'teacher_pretrain,teacher_finetune,student_pretrain,student_kd,evaluate'
  c.reuse_from = ''  # another workdir whose finished stages may be reused (ablations)
  c.eval_batch_size = 128

  c.data = dict(
      dir='',                 # '' = built-in synthetic faces; or folder format / official SCUT-FBP5500_v2
      protocol='60_40',       # official layout only: '60_40' or 'cv1'..'cv5'
      train_split='train',
      eval_split='val',       # scored at the end of training
      # k > 0: cross-validation inside data.dir: rows whose cv_column is k are scored (in
      # place of eval_split), all the others train (README "Seeds, sweeps and error bars")
      cv_fold=0,
      cv_column='cv5_test_fold',
      unlabeled='',           # extra datasets for MAE pretraining (folders, stores, tfds:NAME)
      image_size=64,
      train_pp='random_resized_crop({size}, scale=(0.85, 1.0))|flip_lr|'
               'color_jitter(0.2, 0.2, 0.2)|value_range(-1, 1)',
      eval_pp='value_range(-1, 1)',
      synthetic=dict(num_train=3000, num_val=500, num_test=500, size=64, seed=0),
  )
  c.eval = dict(split='test')  # --mode=eval: scored split ('every row' if no split column)
  c.eval.flip_tta = True  # every score (evaluation, --mode=eval, predict): mean over face + mirror
  c.eval.partial = False  # --mode=eval: True scores the models that load when another's
                          # checkpoints are unreadable (else that is an error)

  c.teacher = dict(
      # 64 px faces, 16 px patches (4x4 tokens): the stem's convolutions (on a 16x16 map
      # after a 4x space-to-depth) carry the fine detail, the transformer the layout.
      model=dict(variant='small', stem='multiscale', patch=16, stem_channels=24,
                 stem_kernels=(3, 5, 7), stem_stride=4, mask_ratio=0.5, num_bins=9, dropout=0.0,
                 # 'fused': jax.nn.dot_product_attention (cuDNN flash on GPUs); 'flax': flax's own
                 attention='fused',
                 # recompute each block in the backward pass: 'none', 'block' or 'dots'
                 # (models/mae.py REMAT; less activation memory for big batches)
                 remat='none'),
      pretrain=optimizer(500, 128, 1.5e-3, 50, norm_pix=True),
      # ld_*: a Gaussian label distribution over the score bins (DLDL) beside the
      # regression loss keeps the binned head from saturating on the mean score's bin.
      # Fine-tuning lr 3e-4 (MAE's 1e-3 * batch / 256): at 1e-3 the synthetic faces' ViT
      # stays on the mean-score plateau (gradient norm -> 0.01; README "Known problems").
      # reinit: comma-separated patterns ('head/*') of parameters that may keep their init
      # when the pretrained stage lacks them or has another shape; any other misfit is an error.
      # mixup: Beta(a, a) mixing of faces and scores in the step (0 = off); ema_decay: the
      # stage hands on an exponential moving average of its weights (0 = the last weights).
      finetune=optimizer(500, 64, 3e-4, 50, layer_decay=0.9, loss='mse', from_pretrained=True,
                         reinit='', ld_weight=1.0, ld_sigma=0.5, mixup=0.0, ema_decay=0.0),
  )
  c.student = dict(
      # Plain 8 px patches (8x8 tokens); feature KD pools them to the teacher's 4x4 grid.
      model=dict(variant='tiny', stem='patch', patch=8, mask_ratio=0.75, num_bins=9, dropout=0.0,
                 attention='fused', remat='none'),
      pretrain=optimizer(300, 128, 1.5e-3, 30, norm_pix=True),
      kd=optimizer(400, 64, 3e-4, 40, layer_decay=0.9, loss='mse', from_pretrained=True,
                   reinit='', ld_weight=1.0, ld_sigma=0.5,
                   alpha=1.0, beta=1.0, output_kd='kl', temperature=2.0, feature_pairs='-1:-1',
                   unlabeled_batch_size=0, mixup=0.0, ema_decay=0.0,
                   # 'WORKDIR/STAGE' of another run (e.g. a face_prior run's pretrain): the
                   # student starts from its MAE params instead of student_pretrain's.
                   init_from=''),
  )
  # A second teacher from outside faceflax (README "An external teacher for the beauty
  # student"): RBF kernel ridge on a pretrained face embedding (teacher: a faceflax.teachers
  # name, e.g. 'dlib_resnet'; '' = off) of the labeled train faces scores every KD face, and
  # the student also regresses that score (weight). gammas x lambdas: chosen by exact
  # leave-one-out error. The embeddings are cached in cache ('' = teacher_cache beside the
  # workdir); workers: processes computing them (0 = one per CPU). embedding_weight > 0:
  # the student also learns the teacher's centred embedding itself (a linear map of its
  # pooled tokens, cosine), as lqfr_kd's celeba_kd student does.
  c.student.kd.external = dict(teacher='', weight=1.0, embedding_weight=0.0,
                               gammas=(1.0, 2.0, 5.0, 10.0),
                               lambdas=(0.03, 0.1, 0.3, 1.0), mirror_average=True, workers=0,
                               cache='')
  c.train = dict(log_every=50, checkpoint_every=500, keep_checkpoints=2, image_every=500)
  config_defaults.add_run_settings(c)

  if not preset:
    # Drawn faces: fine-tuning from the MAE-pretrained encoders stays on the mean-score
    # plateau (README "Known problems": any pretraining length, mask ratio or lr we tried),
    # while from scratch both models learn the drawn traits. So the default job trains the
    # teacher and the KD student from scratch; add the pretraining stages and set
    # from_pretrained=True to run the full method (as the scut and paper presets do).
    c.stages = 'teacher_finetune,student_kd,evaluate'
    c.teacher.finetune.from_pretrained = c.student.kd.from_pretrained = False
    c.student.kd.update(steps=600, warmup_steps=60)
  elif preset == 'scut':
    c.data.dir = f'{SHARED}/scut_fbp5500'
    # Unlabeled colour face crops like SCUT's; FER2013's 48 px greyscale faces are left out.
    c.data.unlabeled = ','.join(f'{SHARED}/{d}' for d in ('utkface', 'celeba_id'))
    # At this CPU budget MAE pretraining helps the plain-patch student but not the
    # multi-scale-stem teacher (README "Results: facial beauty prediction": the teacher
    # fine-tuned from its pretraining scores lower than from scratch). So the teacher
    # trains from scratch and the student is pretrained on the unlabeled faces; add
    # teacher_pretrain to the stages and set teacher.finetune.from_pretrained=True for
    # the paper's recipe (the README's ablation).
    c.stages = 'teacher_finetune,student_pretrain,student_kd,evaluate'
    c.teacher.pretrain.update(steps=1000, warmup_steps=100)
    c.teacher.finetune.update(steps=2500, warmup_steps=100, lr=1e-3, from_pretrained=False)
    c.student.pretrain.update(steps=1000, warmup_steps=100)
    # KD on the labeled faces only: KD on the unlabeled ones as well scored lower (README).
    c.student.kd.update(steps=2500, warmup_steps=100, lr=1e-3)
    c.teacher.finetune.ld_weight = c.student.kd.ld_weight = 0.0
  elif preset == 'paper':
    c.data.image_size = 224
    c.data.synthetic.size = 224
    # remat 'dots': the MAE steps at 1024 keep ~61% of their activation memory for ~1.5% more
    # FLOPs (README "Benchmarks", XLA's memory analysis compiled ahead of time)
    c.teacher.model.update(variant='base', stem_channels=32, remat='dots')
    c.student.model.update(variant='small', patch=16, remat='dots')
    c.teacher.pretrain.update(steps=100_000, batch_size=1024, lr=1.5e-4 * 1024 / 256, warmup_steps=5000)
    c.student.pretrain.update(steps=100_000, batch_size=1024, lr=1.5e-4 * 1024 / 256, warmup_steps=5000)
    c.teacher.finetune.update(steps=20_000, batch_size=256, lr=5e-4, warmup_steps=1000, layer_decay=0.65)
    c.student.kd.update(steps=20_000, batch_size=256, lr=5e-4, warmup_steps=1000, layer_decay=0.65,
                        feature_pairs='-1:-1,5:8', unlabeled_batch_size=256)
    c.train.update(log_every=100, checkpoint_every=2000, image_every=5000)
    c.train.precision = 'auto'  # bf16 on accelerators, fp32 on CPU
  elif preset == 'test':
    c.data.image_size = 32
    c.data.synthetic.update(num_train=64, num_val=32, num_test=32, size=32)
    c.teacher.model.update(variant='test', patch=8, stem_stride=2)
    c.student.model.update(variant='test', patch=8, width=16, num_heads=2)
    for opt in (c.teacher.pretrain, c.student.pretrain, c.teacher.finetune, c.student.kd):
      opt.update(steps=4, batch_size=16, warmup_steps=1)
    c.eval_batch_size = 16
    c.train.update(log_every=2, checkpoint_every=2, image_every=4)
  elif preset:
    raise ValueError(f'unknown preset {preset!r} for fbp_kd; known: scut, paper, test')
  return c
