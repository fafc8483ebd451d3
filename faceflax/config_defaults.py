"""Config keys every task shares, set in one place: the run-level keys (each
``configs/<task>.py`` calls ``add_run_settings`` and keeps only what is specific to its
method) and a training stage's optimizer keys (``optimizer``).

Imports nothing (it only sets keys on the ConfigDict it is given), so reading a config stays
cheap.
"""


def add_run_settings(c, *, data_tfds: bool = True) -> None:
  """Scale-out, failure, input and mesh keys, and the loop's seed (``config.seed``).

  ``data_tfds``: the task reads one dataset from ``data.dir``, or from the TFDS build
  ``data.tfds`` instead; tasks that read several datasets name TFDS builds per dataset
  ('tfds:NAME[/CONFIG]') and only get ``data.tfds_data_dir``.
  """
  # Scale-out (README "Running on a cluster"): 'bf16' compute with fp32 params, micro-batches
  # per step, the device mesh (data=-1: every device the model axis leaves).
  c.train.update(precision='fp32', grad_accum_steps=1)
  c.mesh = dict(data=-1, model=1)
  # README "Failure behaviour": a non-finite step stops the run or is skipped ('skip');
  # bad examples raise an error naming them, or are skipped and counted (skip_bad=True).
  c.train.on_nonfinite = 'stop'
  c.data.skip_bad = False
  # README "Data at scale": 'cache' decodes the split into memory once, 'stream' reads and
  # decodes each step's examples (record stores, datasets larger than memory); 'auto' caches
  # when the decoded split is at most cache_max_gb.
  c.data.input = 'auto'
  c.data.cache_max_gb = 2.0
  if data_tfds:
    # A TFDS dataset instead of data.dir ('scut_fbp5500/cv1', ...; built by
    # `python -m faceflax.data.tfds`).
    c.data.tfds = ''
  # Where TFDS builds are read from (default: TFDS's own).
  c.data.tfds_data_dir = ''
  # Init, dropout, masking and the step keys follow --config.seed (data order and
  # augmentation read config.seed directly).
  c.train.seed = c.get_ref('seed')


def optimizer(steps, batch_size, lr, warmup, *, grad_clip, weight_decay=0.05, layer_decay=1.0,
              **extra) -> dict:
  """A stage's optimizer keys (AdamW, warmup then cosine decay; ``faceflax/train/optim.py``):
  each config binds its own ``grad_clip`` (the global gradient norm) with functools.partial;
  ``extra`` adds stage keys (loss, from_pretrained, ...)."""
  return dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup,
              weight_decay=weight_decay, layer_decay=layer_decay, grad_clip=grad_clip, **extra)
