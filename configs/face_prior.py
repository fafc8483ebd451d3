"""Face-prior pretraining of a ViT on unlabeled faces (pixel, patch and component tasks).

Presets (``--config=configs/face_prior.py:<preset>``):
  (default)  the train splits of ../shared/data (SCUT-FBP5500 with its 86 landmarks;
             UTKFace, CelebA and FER2013 with the aligned-face template), images only,
             the 'tiny' ViT at 64 px with 8 px patches; <= 20 min on 2 CPU cores
  paper      ViT-B/16 at 224 px, paper-length schedule, for accelerators
  test       tiny, seconds; used by the tests

Ablations are runs of the same preset with one weight at 0 (every run has the same budget):
  pixel only (plain MAE):   --config.prior.patch_weight=0 --config.prior.component_weight=0
  without the pixel task:   --config.prior.pixel_weight=0
  without the patch task:   --config.prior.patch_weight=0
  without the component task (random masking): --config.prior.component_weight=0
Then score the encoder downstream:
  python main.py --config=configs/transfer.py --workdir=W/transfer --config.backbone.workdir=W
"""
import ml_collections

from faceflax import config_defaults

SHARED = '../shared/data'


def get_config(preset: str = ''):
  c = ml_collections.ConfigDict()
  c.task = 'face_prior'
  c.seed = 0
  c.stages = 'pretrain,evaluate'
  c.reuse_from = ''
  c.eval_batch_size = 128

  c.data = dict(
      root=SHARED,  # relative to the working directory (the project root)
      datasets='scut_fbp5500,utkface,celeba_id,fer2013',  # folders or stores under root, or tfds:NAME
      train_split='train',  # pretraining reads images (and landmarks) of this split only
      eval_split='val',
      image_size=64,
      # face_regions rasterises the region map; the geometric ops move it with the image.
      train_pp='face_regions|random_resized_crop({size}, scale=(0.6, 1.0))|flip_lr|'
               'color_jitter(0.2, 0.2, 0.2)|value_range(-1, 1)|keep("image", "regions")',
      eval_pp='face_regions|value_range(-1, 1)|keep("image", "regions")',
  )
  c.model = dict(variant='tiny', stem='patch', patch=8, mask_ratio=0.75, attention='fused',
                 remat='none')
  c.prior = dict(
      pixel_weight=1.0,       # masked image modelling
      patch_weight=0.5,       # per-token facial-region prediction
      component_weight=1.0,   # whole-component masking + component feature prediction
      norm_pix=True,
      membership_threshold=0.1,  # a patch belongs to a component covering >= 10% of it
  )
  c.train = dict(steps=800, batch_size=128, lr=1.5e-3, warmup_steps=100, weight_decay=0.05,
                 grad_clip=1.0, log_every=50, checkpoint_every=500, keep_checkpoints=2)
  config_defaults.add_run_settings(c, data_tfds=False)
  c.eval = dict(split='val')  # --mode=eval

  if preset == 'paper':
    c.data.image_size = 224
    c.model.update(variant='base', patch=16, remat='dots')  # as fbp_kd's paper MAEs
    c.train.precision = 'auto'  # bf16 on accelerators, fp32 on CPU
    c.train.update(steps=100_000, batch_size=1024, lr=1.5e-4 * 1024 / 256, warmup_steps=5000,
                   log_every=100, checkpoint_every=5000)
  elif preset == 'test':
    c.data.image_size = 32
    c.model.update(variant='test', patch=8)
    c.train.update(steps=4, batch_size=16, warmup_steps=1, log_every=2, checkpoint_every=2)
    c.eval_batch_size = 16
  elif preset:
    raise ValueError(f'unknown preset {preset!r} for face_prior; known: paper, test')
  return c
