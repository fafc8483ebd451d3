"""Face-prior pretraining: a ViT masked autoencoder with pixel-, patch- and component-level tasks.

Stages (``config.stages``), each checkpointed under ``<workdir>/<stage>``:
  pretrain  one jit step, three weighted terms (a weight of 0 switches a task off):
            pixel      MAE: the per-patch normalised pixels of the masked patches
            patch      every visible token predicts which facial regions its patch
                       covers: soft cross-entropy against the patch's region fractions
                       (``face_regions.REGIONS``, from landmarks or the aligned-face template)
            component  one facial component per face (``face_regions.COMPONENTS``) is
                       masked whole, random patches fill up the mask ratio; the decoder
                       predicts the component's representation: its mean token in the
                       encoder's view of the unmasked face minus the face's mean token
                       (stop-gradient), by cosine.
                       With this task off the masking is plain random (MAE).
  evaluate  the enabled terms and the patch-region accuracy on held-out val faces
            -> ``<workdir>/results.json``
The encoder is scored downstream by the transfer benchmark (``configs/transfer.py``,
backbone stage 'pretrain'; the checkpoint's params are {'mae': ..., 'prior': ...}).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from faceflax import config_checks, losses, reports
from faceflax.data import face_regions, pipeline, records
from faceflax.data.errors import DataError
from faceflax.data.folder import in_split, read_folder
from faceflax.models import mae
from faceflax.train import job as job_lib, loop, mesh as mesh_lib, optim, stages as stages_lib
from faceflax.train import state as state_lib

TERMS = ('pixel', 'patch', 'component')


class PriorHeads(nn.Module):
  """Linear heads of the two face-prior tasks (dropped after pretraining)."""
  num_regions: int
  width: int

  @nn.compact
  def __call__(self, latent, decoded):
    return (nn.Dense(self.num_regions, name='region')(latent),
            nn.Dense(self.width, name='component')(decoded))


def check_config(config) -> None:
  p = config.prior
  weights = {t: p[f'{t}_weight'] for t in TERMS}
  if any(w < 0 for w in weights.values()) or not any(weights.values()):
    raise ValueError(f'prior weights {weights}: need >= 0 and at least one > 0')
  config_checks.check_mae(mae.from_config(config.model, config.data.image_size), 'model')
  if not 0 < p.membership_threshold <= 1:
    raise ValueError(f'prior.membership_threshold={p.membership_threshold}: must be in (0, 1]')
  stages_lib.parse(config.stages, Job.known_stages())


def init_params(model: mae.MAE, heads: PriorHeads, rng, size: int) -> dict:
  """The MAE's parameters (``mae.init_params``: a small copy's init, no training forward)
  and the heads', which depend only on the widths of the tokens they read."""
  tokens = lambda width: jnp.zeros((1, 1, width), jnp.float32)
  return {'mae': mae.init_params(model, rng, size),
          'prior': heads.init(jax.random.fold_in(rng, 3), tokens(model.width),
                              tokens(model.decoder_width))['params']}


# ----------------------------------------------------------------------------- the step

def component_members(fractions, threshold: float, rng):
  """[B, N] 1 for the patches of one facial component drawn per face among those present."""
  members = face_regions.component_membership(fractions, threshold)  # [B, N, C]
  present = members.any(axis=1)                                       # [B, C]
  choice = jax.random.categorical(rng, jnp.where(present, 0.0, -1e9))  # uniform over present
  member = jnp.take_along_axis(members, choice[:, None, None], axis=2)[..., 0]
  return (member & present.any(axis=1, keepdims=True)).astype(jnp.float32)


def masked_pretrain(model: mae.MAE, cfg, mae_params, images, fractions, rng, train=True):
  """The MAE pretraining pass with this task's masking: (outputs, component members or None).

  With the component task on, one facial component per face is masked whole first.
  """
  mask_rng, component_rng, dropout_rng = jax.random.split(rng, 3)
  member = None
  if cfg.component_weight:
    member = component_members(fractions, cfg.membership_threshold, component_rng)
  out = model.apply({'params': mae_params}, images, train, mask_priority=member,
                    method=model.pretrain, rngs={'mask': mask_rng, 'dropout': dropout_rng})
  return out, member


def prior_terms(model: mae.MAE, heads: PriorHeads, cfg, params, batch, rng, train=True):
  """(weighted total, per-term dict) of the enabled face-prior tasks on one batch."""
  images = batch['image']
  fractions = face_regions.patch_fractions(batch['regions'], model.patch)  # [B, N, R]
  out, member = masked_pretrain(model, cfg, params['mae'], images, fractions, rng, train)
  region_logits, component_pred = heads.apply({'params': params['prior']}, out['latent'],
                                              out['decoded'])
  terms, aux = {}, {}
  if cfg.pixel_weight:
    terms['pixel'] = losses.mae_reconstruction(out['pred'], out['target'], out['mask'],
                                               cfg.norm_pix)
  if cfg.patch_weight:
    visible = jnp.take_along_axis(fractions, out['keep_idx'][..., None], axis=1)
    terms['patch'] = losses.soft_cross_entropy(region_logits, visible)
    aux['region_accuracy'] = jnp.mean(region_logits.argmax(-1) == visible.argmax(-1))
  if cfg.component_weight:
    tokens, _ = model.apply({'params': params['mae']}, images, method=model.tokens)
    # Centred per face: the raw tokens share one dominant direction (cosine ~0.95
    # for any pooled set), so the target is the component relative to the whole face.
    target = jax.lax.stop_gradient(tokens - tokens.mean(axis=1, keepdims=True))
    present = member * out['mask']
    terms['component'] = losses.pooled_feature_cosine(component_pred, target, present)
    aux['component_tokens'] = jnp.mean(member.sum(-1))
    # A mean over the faces with a masked component token: accumulated by their count.
    faces = jnp.sum(present.sum(-1) > 0)
    aux[state_lib.MASKED] = {'component': (cfg.component_weight * terms['component'], faces)}
  total = sum(cfg[f'{t}_weight'] * v for t, v in terms.items())
  return total, {**terms, **aux}


# ----------------------------------------------------------------------------- data

def dataset_entries(config) -> list[str]:
  names = [n.strip() for n in config.data.datasets.split(',') if n.strip()]
  if not names:
    raise ValueError('data.datasets is empty: name at least one folder under data.root')
  return names


def dataset_name(entry: str) -> str:
  """'utkface' of 'utkface', '/data/utkface' or 'tfds:utkface/v1': what names its chip framing."""
  if entry.startswith(records.TFDS_PREFIX):
    return entry[len(records.TFDS_PREFIX):].split('/')[0]
  return os.path.basename(os.path.normpath(entry))


def load_faces(config, split: str) -> tuple[object, np.ndarray]:
  """Images and face shapes of ``split`` of every dataset (a dataset without splits gives
  all rows). A dataset is a folder, a record store (with its landmarks when it was
  prepared from a folder that had them) or 'tfds:NAME'.

  The labels are never read: pretraining sees images and face geometry only.
  """
  parts, shapes = [], []
  for entry in dataset_entries(config):
    root = records.dataset_path(entry, config.data.root, config.data.get('tfds_data_dir', ''))
    examples = read_folder(root)
    examples = examples.select(in_split(examples, split))
    if not len(examples):
      raise DataError(f'{root}: no rows with split {split!r}')
    parts.append(examples.images)
    template = face_regions.CHIP_TEMPLATES.get(dataset_name(entry), face_regions.ARCFACE_TEMPLATE)
    shapes.append(face_regions.load_face_shapes(root, examples, template))
    logging.info('%s split %r: %d faces', root, split, len(examples))
  return pipeline.join_images(parts), np.concatenate(shapes)


# ----------------------------------------------------------------------------- stages

def pretrain_stage(model, heads, config) -> loop.Stage:
  """The face-prior step (without batches: ``Job.batches``); the MAE's parameters may be
  split over the mesh's 'model' axis like fbp_kd's, the small heads are replicated."""
  cfg, size = config.train, config.data.image_size
  tx, sched = optim.adamw(cfg, cfg.steps)

  def init_fn(rng):
    return state_lib.init_state(init_params(model, heads, rng, size), tx)

  def loss_fn(params, batch, rng):
    return prior_terms(model, heads, config.prior, params, batch, rng)

  template = jax.eval_shape(lambda rng: init_params(model, heads, rng, size), jax.random.key(0))
  axes = {'mae': mae.param_axes(model, size),
          'prior': mesh_lib.unsplit_axes(template['prior'])}
  # data.train_pp keeps the image and its region map (face_regions: one channel per region)
  return loop.train_stage('pretrain', cfg, (tx, sched), init_fn, loss_fn, size,
                          {'regions': (size, size, len(face_regions.REGIONS))}, param_axes=axes)


def evaluate_terms(model, heads, config, params, faces, mesh) -> dict:
  """Mean of each enabled term over the val faces, with a fixed masking seed per batch.

  The terms are batch means, so only whole batches are scored; the remainder
  (fewer than ``eval_batch_size`` faces) is reported as 'n_left_out'.
  """
  images, shapes = faces
  bs = config.eval_batch_size
  mesh_lib.check_batch_size(bs, 'eval_batch_size')
  whole = len(images) // bs * bs
  if not whole:
    raise DataError(f'{len(images)} val faces do not fill one eval batch of {bs}')
  step = jax.jit(lambda p, b, r: state_lib.without_masked(
      prior_terms(model, heads, config.prior, p, b, r, train=False)[1]))
  ds = pipeline.make_eval_dataset(pipeline.head(images, whole), {'face_shapes': shapes[:whole]}, batch_size=bs,
                                  pp=pipeline.spec(config, config.data.eval_pp),
                                  cache_pp=pipeline.cache_pp(config),
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), progress='evaluate')
  sums = {}
  for i, batch in enumerate(ds):
    batch = mesh_lib.put_batch({k: batch[k] for k in ('image', 'regions')}, mesh)
    for k, v in jax.device_get(step(params, batch, jax.random.key(i))).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {k: v / len(ds) for k, v in sums.items()} | {'n': whole, 'n_left_out': len(images) - whole}


# ----------------------------------------------------------------------------- the job

class Job(job_lib.Job):
  """One 'pretrain' stage; its encoder is scored downstream by configs/transfer.py."""

  STAGES = ('pretrain',)
  check_config = staticmethod(check_config)

  def __init__(self, config, workdir, restore_only: bool = False):
    super().__init__(config, workdir, restore_only)
    self.model = mae.from_config(config.model, config.data.image_size, self.dtype)
    self.heads = PriorHeads(len(face_regions.REGIONS), self.model.width)

  @staticmethod
  def data_reads(config, workdir):
    del workdir
    return {'pretrain': lambda: load_faces(config, config.data.train_split),
            'evaluate': lambda: load_faces(config, config.data.eval_split)}

  def eval_name(self) -> str:
    return f'eval_{self.config.eval.split}'

  def build(self, name, upstream):
    del name, upstream  # one stage, nothing upstream
    return pretrain_stage(self.model, self.heads, self.config)

  def batches(self, name):
    c = self.config
    images, shapes = load_faces(c, c.data.train_split)
    return pipeline.train_batches(c, images, {'face_shapes': shapes},
                                  batch_size=c.train.batch_size, pp=c.data.train_pp, seed=c.seed)

  def evaluate(self, split, prefix):
    faces = load_faces(self.config, split)
    params = self.state('pretrain')['params']
    results = {'val': evaluate_terms(self.model, self.heads, self.config, params, faces,
                                     self.mesh)}
    self.write_reports(params, faces, prefix)  # all processes: the model runs
    results['model'] = {'variant': self.config.model.variant,
                        'encoder_params': loop.count_params(
                            {k: v for k, v in params['mae'].items()
                             if not k.startswith('decoder') and k != 'mask_token'}),
                        'image_size': self.config.data.image_size, 'patch': self.model.patch}
    results['prior'] = self.config.prior.to_dict()
    results['data'] = {'datasets': self.config.data.datasets, 'split': split}
    return results

  def write_reports(self, params, faces, prefix: str) -> None:
    """The pretraining's masking and pixel reconstruction of 4 faces -> reports/.

    Masked input | prediction | original, one row per face; skipped when the pixel task
    is off (its decoder head is then untrained).
    """
    c = self.config
    if not c.prior.pixel_weight:
      return
    images, shapes = faces
    batch = reports.probe_batch(images, pipeline.spec(c, c.data.eval_pp), pipeline.cache_pp(c),
                                labels={'face_shapes': shapes})
    fractions = face_regions.patch_fractions(jnp.asarray(batch['regions']), self.model.patch)
    out, _ = masked_pretrain(self.model, c.prior, params['mae'], jnp.asarray(batch['image']),
                             fractions, jax.random.key(0), train=False)
    grid = reports.reconstruction_grid(out, self.model.patch, c.prior.norm_pix)
    reports.save(self.workdir, f'{prefix}_reconstruction', np.concatenate(list(grid), 0),
                 self.writer)

  def predict_heads(self):
    """The pooled encoder features -> ``<output stem>_features.npy`` (+ CSV), aligned to the
    chips of the first of ``data.datasets``."""
    from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top  # TensorFlow
    params = self.state('pretrain')['params']['mae']
    fn = job_lib.replicated_jit(lambda p, x: self.model.apply({'params': p}, x)['pooled'],
                                self.mesh)
    head = predict_lib.Head(lambda x: {'features': fn(params, x)}, self.config.data.image_size,
                            dataset_name(dataset_entries(self.config)[0]))
    return [head], None

  @staticmethod
  def log_results(results: dict, writer) -> None:
    val = {k: v for k, v in results['val'].items() if k not in ('n', 'n_left_out')}
    logging.info('face-prior val (n=%d): %s', results['val']['n'],
                 '  '.join(f'{k}={v:.4f}' for k, v in val.items()))
    job_lib.log_scalars(writer, {f'eval/{k}': v for k, v in val.items()})
