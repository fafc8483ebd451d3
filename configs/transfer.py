"""Transfer benchmark: a pretrained MAE ViT backbone scored on downstream face tasks.

Tasks (``tasks``; train split -> val split of each folder-format dataset):
  expression  fer2013        7 expressions, softmax          accuracy
  attributes  celeba_id      40 CelebA attributes, sigmoids  mean accuracy over attributes
  age         utkface        age regression (L1)             MAE in years
  beauty      scut_fbp5500   score regression (MSE)          Pearson correlation (PC)
Protocols (``protocols``):
  linear    frozen mean-pooled encoder features -> ridge (regression) or logistic probe
  fewshot   the same probe on ``fewshot.per_class`` faces per class (classification) or
            ``fewshot.fraction`` of the train rows, ``fewshot.seeds`` draws: mean and std
  finetune  the whole backbone + a fresh linear head, ``finetune.steps`` steps, as stage
            ``finetune_<task>`` (checkpointed under W/finetune_<task>, resumed like any stage)
-> W/results.json and a table in the log and W/results.md. ``--mode=eval`` re-runs the probes
and scores the finished fine-tuned models -> W/eval.json.

Presets (``--config=configs/transfer.py:<preset>``):
  (default)  the CPU setting of the repo's table: 64 px, ViT 'tiny' with 8 px patches,
             fine-tuning 200 steps of 64 per task; all four tasks on ../shared/data
  test       tiny model and schedules, seconds; used by the tests

The backbone is the MAE params of a finished stage: ``backbone.workdir``/``backbone.stage``
(its newest checkpoint), built with ``backbone.model`` at ``backbone.image_size``; the
model must match the checkpoint (a mismatched encoder is an error naming the weights).
``backbone.workdir=''`` is the scratch baseline (randomly initialised encoder). Examples,
run from the project root:

  # the face-prior ViT (mae.make('tiny', image_size=64, stem='patch', patch=8)), stage 'pretrain'
  python main.py --config=configs/transfer.py --workdir=W_transfer_prior \\
      --config.backbone.workdir=W --config.backbone.stage=pretrain
  # the FBP MAE teacher of `configs/fbp_kd.py:scut` (multi-scale stem, 16 px patches)
  python main.py --config=configs/transfer.py --workdir=W_transfer_fbp \\
      --config.backbone.workdir=/work/runs/fbp_scut --config.backbone.stage=teacher_pretrain \\
      --config.backbone.model.variant=small --config.backbone.model.stem=multiscale \\
      --config.backbone.model.patch=16 --config.backbone.model.stem_stride=4
  # the scratch baseline (same model, random init)
  python main.py --config=configs/transfer.py --workdir=W_transfer_scratch
  # a subset: --config.tasks=age,beauty --config.protocols=linear,fewshot

Any fbp_kd stage works as a backbone (teacher_pretrain / teacher_finetune store the MAE
params, student_kd stores them under 'student'; student_pretrain / student_kd fit the default
model). A workdir holds one backbone's results (W/backbone.json; another backbone there is an
error), so its finished finetune_<task> stages are never mixed up. Datasets: ``data.root`` + ``data.dirs.<task>``
(a folder or record store; `tfds:NAME` reads a TFDS build from ``data.tfds_data_dir``)
(an absolute ``data.dirs.<task>`` is used as is); ``data.max_train`` / ``data.max_val`` > 0
take a fixed random subset of each split (quick looks only: the table uses every row).
"""
import ml_collections

from faceflax import config_defaults

SHARED = '../shared/data'


def get_config(preset: str = ''):
  c = ml_collections.ConfigDict()
  c.task = 'transfer'
  c.seed = 0
  c.tasks = 'expression,attributes,age,beauty'
  c.protocols = 'linear,fewshot,finetune'
  c.reuse_from = ''  # another workdir whose finished finetune_<task> stages may be reused
  c.eval_batch_size = 128

  c.backbone = dict(
      workdir='',        # '' = scratch baseline (random init)
      stage='pretrain',  # <workdir>/<stage>/ckpt, newest step
      # what may keep its init when the stage lacks it or has another shape (the heads and
      # the MAE decoder); every stem / encoder weight must load
      reinit='head/*,mask_token,decoder*',
      image_size=64,
      # mae.make(variant, image_size=..., **rest): the keys of configs/fbp_kd.py teacher.model
      model=dict(variant='tiny', stem='patch', patch=8, stem_channels=24,
                 stem_kernels=(3, 5, 7), stem_stride=2, dropout=0.0, attention='fused',
                 remat='none'),
  )
  c.data = dict(
      root=SHARED,       # relative to the working directory (the project root)
      dirs=dict(expression='fer2013', attributes='celeba_id', age='utkface',
                beauty='scut_fbp5500'),
      train_split='train',
      eval_split='val',
      max_train=0,       # > 0: a fixed random subset of the train split (0 = all rows)
      max_val=0,
      # fine-tuning augmentation; faces are decoded and resized to image_size once
      train_pp='random_resized_crop({size}, scale=(0.8, 1.0))|flip_lr|value_range(-1, 1)',
      eval_pp='value_range(-1, 1)',
  )
  # Probes on standardised features; penalties are per example (mean loss + lam |W|^2).
  # Ridge takes the lambda of least exact leave-one-out error on the rows it is fitted
  # to (train rows only; a one-element tuple fixes it); the logistic probes use l2 / 2.
  c.linear = dict(ridge_lambda=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), l2=1e-3, max_steps=500,
                  tol=1e-5)
  c.fewshot = dict(per_class=10, fraction=0.02, seeds=3)
  c.finetune = config_defaults.optimizer(200, 64, 1e-3, 20, layer_decay=0.75, grad_clip=1.0)
  c.train = dict(log_every=50, checkpoint_every=500, keep_checkpoints=1)
  config_defaults.add_run_settings(c, data_tfds=False)

  if preset == 'test':
    c.backbone.image_size = 32
    c.backbone.model.update(variant='test', stem_channels=8)
    c.linear.update(max_steps=50)
    c.fewshot.update(per_class=2, fraction=0.25, seeds=2)
    c.finetune.update(steps=4, batch_size=16, warmup_steps=1)
    c.train.update(log_every=2, checkpoint_every=4)
    c.eval_batch_size = 16
  elif preset:
    raise ValueError(f'unknown preset {preset!r} for transfer; known: test')
  return c
