"""Low-quality face recognition by knowledge distillation (ResNeXt-CBAM, ArcFace).

Stages (``config.stages``), each checkpointed under ``<workdir>/<stage>``:
  teacher            ArcFace on high-quality faces
  student_<variant>  ArcFace on degraded faces made on the fly in tf.data, plus KD from
                     the frozen teacher, which sees the high-quality view of the same
                     image inside the student's jit-compiled step (one XLA graph).
                     Variants: nokd, output, attention, both, external (output KD from
                     precomputed embeddings of a non-faceflax teacher)
  evaluate           10-fold verification accuracy and TAR@FAR at each image quality,
                     for both-sides-degraded and degraded-probe-vs-HQ-gallery pairs
"""
import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from faceflax import distributed, losses, metrics, reports
from faceflax.data import align as align_lib, pairs as pairs_lib, pipeline, synthetic
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, in_split, load_array, read_folder
from faceflax.models import heads, resnext_cbam
from faceflax.train import checkpoint, loop, mesh as mesh_lib, optim, precision
from faceflax.train import stages as stages_lib, state as state_lib

# variant: (output KD, attention KD, external teacher)
STUDENT_VARIANTS = {
    'nokd': (False, False, False),
    'output': (True, False, False),
    'attention': (False, True, False),
    'both': (True, True, False),
    'external': (True, False, True),
}
STAGES = ('teacher', *(f'student_{v}' for v in STUDENT_VARIANTS), 'evaluate')


# ----------------------------------------------------------------------------- models

class Recognizer(nn.Module):
  """Backbone embedding plus an ArcFace classifier over the training identities."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    out = dict(self.backbone(images, train=train))
    out['cosine'] = heads.ArcFaceHead(self.num_classes, name='arcface')(out['embedding'])
    return out


def make_model(model_config, num_classes: int, dtype=jnp.float32) -> Recognizer:
  """``dtype``: compute dtype (``precision.compute_dtype(config.train)``)."""
  kwargs = dict(model_config)
  return Recognizer(resnext_cbam.make(kwargs.pop('variant'), dtype=dtype, **kwargs), num_classes)


def init_variables(model: Recognizer, rng, size: int) -> dict:
  return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, size, size, 3)))


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class TrainSet:
  examples: Examples
  labels: np.ndarray         # contiguous class index per example
  num_classes: int
  rows: np.ndarray           # labels.csv row of each example (for per-row arrays)


def train_set(config) -> TrainSet:
  d = config.data
  everything = read_folder(d.dir, label_columns=(d.identity_column,))
  keep = np.ones(len(everything), bool)
  if 'split' in everything.labels:
    keep &= in_split(everything, d.train_split)
  else:
    logging.warning('%s has no split column: training on every row', d.dir)
  if d.drop_noisy and 'id_noisy' in everything.labels:
    noisy = keep & (everything.labels['id_noisy'] == 1)
    logging.info('not training on %d rows marked id_noisy=1', int(noisy.sum()))
    keep &= ~noisy
  if not keep.any():
    raise DataError(f'{d.dir}: no training rows (split {d.train_split!r})')
  examples = everything.select(keep)
  rows = examples.rows  # labels.csv rows, even when bad rows were skipped
  classes, labels = np.unique(examples.labels[d.identity_column], return_inverse=True)
  logging.info('training identities: %d, images: %d', len(classes), len(examples))
  return TrainSet(examples, labels.astype(np.int32), len(classes), rows)


def external_embeddings(config, ts: TrainSet) -> np.ndarray:
  """The external teacher's embedding of each training example (one .npy row per csv row)."""
  path = os.path.join(config.data.dir, config.data.external_teacher)
  if not os.path.isfile(path):
    raise DataError(f'student_external needs the teacher embeddings {path}: no such file')
  emb = load_array(path)
  num_rows = len(read_folder(config.data.dir, check_files=False))
  if emb.ndim != 2 or emb.shape[0] != num_rows:
    raise DataError(f'{path}: shape {emb.shape}, expected ({num_rows}, dim): one row per '
                    'labels.csv row')
  if not np.all(np.isfinite(emb)):
    raise DataError(f'{path}: non-finite values in rows {np.flatnonzero(~np.isfinite(emb).all(1))[:5]}')
  return emb[ts.rows].astype(np.float32)


def external_dim(config) -> int:
  path = os.path.join(config.data.dir, config.data.external_teacher)
  if not os.path.isfile(path):
    raise DataError(f'student_external needs the teacher embeddings {path}: no such file')
  return int(load_array(path, mmap_mode='r').shape[1])


def data_facts(config, ts: TrainSet) -> dict:
  """What the models take from the training data (``stages.record_facts``): the ArcFace
  classes, the external teacher's width (if the data has its embeddings) and the folder
  name that picks predict's alignment template."""
  facts = {'num_classes': ts.num_classes, 'dataset': align_lib.folder_name(config.data.dir)}
  if config.data.external_teacher and os.path.isfile(
      os.path.join(config.data.dir, config.data.external_teacher)):
    facts['external_dim'] = external_dim(config)
  return facts


def train_batches(config, ts: TrainSet, batch_size: int, seed: int, *, degraded: bool,
                  external=None):
  labels = {'label': ts.labels}
  if external is not None:
    labels['teacher_embedding'] = external
  # Degrade first: the later ops (flip, value range) then act on both views alike.
  pp = f'{config.data.degrade}|{config.data.train_pp}' if degraded else config.data.train_pp
  return pipeline.train_batches(config, ts.examples.images, labels, batch_size=batch_size,
                                pp=pp, seed=seed)


# ----------------------------------------------------------------------------- stages

def _apply_train(model, variables, images, rng):
  out, new = model.apply(variables, images, train=True, rngs={'dropout': rng},
                         mutable=['batch_stats'])
  return out, new['batch_stats']


def _arcface_terms(out, labels, arc) -> tuple[jax.Array, dict]:
  labels = labels.astype(jnp.int32)
  loss = losses.arcface(out['cosine'], labels, arc.scale, arc.margin)
  accuracy = jnp.mean(jnp.argmax(out['cosine'], -1) == labels)
  return loss, {'arcface': loss, 'train_accuracy': accuracy}


def teacher_stage(name, model, config, ts: TrainSet | None) -> loop.Stage:
  """``ts`` None: no batches (a stage built only to load its checkpoint)."""
  cfg, arc, size = config.teacher.train, config.teacher.arcface, config.data.image_size
  tx, sched = optim.adamw(cfg, cfg.steps)

  def init_fn(rng):
    v = init_variables(model, rng, size)
    return state_lib.init_state(v['params'], tx, v['batch_stats'])

  def loss_fn(params, batch, rng, model_state):
    out, model_state = _apply_train(model, {'params': params, 'batch_stats': model_state},
                                    batch['image'], rng)
    loss, terms = _arcface_terms(out, batch['label'], arc)
    return loss, (terms, model_state)

  return loop.Stage(
      name=name, num_steps=cfg.steps, batch_size=cfg.batch_size, init_fn=init_fn,
      update_fn=state_lib.make_update(loss_fn, tx), schedule=sched,
      batches=None if ts is None else train_batches(config, ts, cfg.batch_size, config.seed,
                                                    degraded=False),
      batch_spec=loop.batch_spec(cfg.batch_size, size, label=()))


def student_stage(name, student, teacher, config, ts: TrainSet | None, teacher_vars,
                  external=None) -> loop.Stage:
  """ArcFace on degraded faces + alpha * output KD + beta * attention KD, one jit step.

  ``ts`` None: no batches (a stage built only to load its checkpoint, or to time its step).
  ``external``: the external teacher's embeddings (``student_external``), or any [n, dim]
  array of their width when ``ts`` is None.
  """
  variant = name[len('student_'):]
  use_output, use_attention, use_external = STUDENT_VARIANTS[variant]
  cfg, arc, kd, size = config.student.train, config.student.arcface, config.student.kd, config.data.image_size
  alpha = kd.alpha if use_output else 0.0
  beta = kd.beta if use_attention else 0.0
  maps = [m.strip() for m in kd.maps.split(',') if m.strip()]  # check_config checked them
  s_dim = student.backbone.embed_dim
  target_dim = (external.shape[1] if use_external
                else teacher.backbone.embed_dim if alpha and kd.output == 'embedding' else s_dim)
  # The student's embedding is projected only where widths differ (always for an
  # external teacher, whose embedding space is not the student's).
  projector = nn.Dense(target_dim, name='projector') if use_external or target_dim != s_dim else None

  def init_params(rng):
    v = init_variables(student, rng, size)
    params = {'student': v['params']}
    if projector is not None:
      params['projector'] = projector.init(jax.random.fold_in(rng, 1), jnp.zeros((1, s_dim)))['params']
    return params, v['batch_stats']

  tx, sched = optim.adamw(cfg, cfg.steps)
  labels = {'image_lq': (size, size, 3), 'label': ()}  # what a batch holds beside 'image'
  if use_external:
    labels['teacher_embedding'] = external.shape[1:]

  def init_fn(rng):
    params, batch_stats = init_params(rng)
    return state_lib.init_state(params, tx, batch_stats)

  def loss_fn(params, batch, rng, teacher_vars, model_state):
    s_out, model_state = _apply_train(
        student, {'params': params['student'], 'batch_stats': model_state}, batch['image_lq'], rng)
    total, terms = _arcface_terms(s_out, batch['label'], arc)
    if (alpha and not use_external) or beta:
      # The frozen teacher sees the high-quality view, in inference mode.
      t_out = teacher.apply(jax.lax.stop_gradient(teacher_vars), batch['image'])
    if alpha:
      if use_external or kd.output == 'embedding':
        target = batch['teacher_embedding'] if use_external else t_out['embedding']
        emb = s_out['embedding']
        if projector is not None:
          emb = projector.apply({'params': params['projector']}, emb)
        terms['output_kd'] = losses.embedding_distillation(emb, target, kind='cosine')
      else:
        terms['output_kd'] = losses.distillation_kl(
            arc.scale * s_out['cosine'], arc.scale * t_out['cosine'], kd.temperature)
      total += alpha * terms['output_kd']
    if beta:
      terms['attention_kd'] = sum(
          losses.attention_transfer(s_out[f'{m}_attention'], t_out[f'{m}_attention'])
          for m in maps) / max(len(maps), 1)
      total += beta * terms['attention_kd']
    return total, (terms, model_state)

  return loop.Stage(
      name=name, num_steps=cfg.steps, batch_size=cfg.batch_size, init_fn=init_fn,
      update_fn=state_lib.make_update(loss_fn, tx), schedule=sched,
      batches=None if ts is None else train_batches(
          config, ts, cfg.batch_size, config.seed + 1, degraded=True,
          external=external if use_external else None),
      batch_spec=loop.batch_spec(cfg.batch_size, size, **labels),
      consts=(teacher_vars,), loss_fn=loss_fn)


# ----------------------------------------------------------------------------- evaluation

def check_config(config) -> None:
  """Inconsistent settings, before any data is read or step compiled (``app.run`` calls it)."""
  names = stages_lib.parse(config.stages, STAGES)
  kd = config.student.kd
  unknown = {m.strip() for m in kd.maps.split(',') if m.strip()} - {'channel', 'spatial'}
  if unknown:
    raise ValueError(f'student.kd.maps: unknown map kind(s) {sorted(unknown)}; known: channel, spatial')
  if kd.output not in ('embedding', 'logits'):
    raise ValueError(f"student.kd.output={kd.output!r}: expected 'embedding' or 'logits'")
  qualities(config)
  if not 0 < config.eval.far < 1 or config.eval.num_folds < 2:
    raise ValueError(f'eval.far={config.eval.far} must be in (0, 1) and eval.num_folds='
                     f'{config.eval.num_folds} >= 2')
  teacher, student = (resnext_cbam.make(**config[who].model.to_dict()) for who in ('teacher', 'student'))
  if len(student.stage_sizes) != len(teacher.stage_sizes) or any(
      s > t for s, t in zip(student.stage_sizes, teacher.stage_sizes)):
    raise ValueError(f'student.model (blocks {tuple(student.stage_sizes)}) must be no deeper than '
                     f'teacher.model (blocks {tuple(teacher.stage_sizes)}), with as many stages')
  if kd.beta and any(STUDENT_VARIANTS[n[len('student_'):]][1] for n in names
                     if n.startswith('student_')) and (
      student.stage_widths() != teacher.stage_widths() or student.stem_stride != teacher.stem_stride):
    raise ValueError(f'attention KD compares the stages\' attention maps: student.model widths '
                     f'{student.stage_widths()} (stem stride {student.stem_stride}) must equal '
                     f'teacher.model\'s {teacher.stage_widths()} (stem stride {teacher.stem_stride})')


def qualities(config) -> list[str]:
  """'hq'; 'N': down to N px (area) and back; 'xF': the low-resolution protocol of
  the paper and of the face-SR literature, a Gaussian blur of sigma F/2 then bicubic
  downsampling by F (antialiased, as MATLAB's imresize) and bicubic back."""
  out = [q.strip() for q in config.eval.qualities.split(',') if q.strip()]
  for q in out:
    if q != 'hq' and not q.isdigit() and not (q[:1] == 'x' and q[1:].isdigit() and int(q[1:])):
      raise ValueError(f"eval.qualities: {q!r} is neither 'hq', a size in pixels nor a "
                       "downsampling factor 'x2', 'x4', ...")
  return out


def quality_pp(quality: str, size: int, eval_pp: str) -> str:
  """The eval preprocessing of one ``qualities`` entry: its degradation (the degraded view
  is 'image_lq'), then ``eval_pp`` (``data.eval_pp``, as every evaluation and prediction)."""
  if quality == 'hq':
    return eval_pp
  if quality.isdigit():
    return f'degrade(resolution={int(quality)})|{eval_pp}'
  factor = int(quality[1:])
  return (f'degrade(resolution={max(1, size // factor)}, blur={factor / 2}, '
          f"downsample='bicubic')|{eval_pp}")


def embedding_fn(model, mesh):
  """Jitted (variables, images) -> L2-normalised embeddings, replicated."""
  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))
  def forward(v, x):
    e = model.apply(v, x)['embedding'].astype(jnp.float32)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return forward


def embed(model, variables, paths, config, mesh, quality: str, forward=None) -> np.ndarray:
  """L2-normalised embeddings of ``paths`` (in order) at one image quality.

  Pass ``forward`` (from ``embedding_fn``) to reuse one compiled function across qualities.
  """
  bs = config.eval_batch_size
  mesh_lib.check_batch_size(bs, 'eval_batch_size')
  key = 'image' if quality == 'hq' else 'image_lq'
  pp = quality_pp(quality, config.data.image_size, config.data.eval_pp)
  forward = forward or embedding_fn(model, mesh)
  ds = pipeline.make_eval_dataset(paths, {}, batch_size=bs, pp=pp,
                                  cache_pp=pipeline.cache_pp(config),
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), validate=False,
                                  progress=f'embed ({quality})')
  out = []
  for batch in ds:
    batch = mesh_lib.put_batch({'x': batch[key], 'mask': batch['mask']}, mesh)
    emb = np.asarray(forward(variables, batch['x']))
    mask = np.asarray(multihost_utils.process_allgather(batch['mask'], tiled=True))
    out.append(emb[mask])
  return np.concatenate(out)


def verification_table(embeddings: dict, pairs, config, rocs: dict | None = None) -> dict:
  """embeddings: quality -> [N, D] over the unique images; pairs index into them.

  ``rocs`` (if given) receives each row's ROC curve: key -> (fpr, tpr).
  """
  a, b, same = pairs
  table = {}
  hq = embeddings.get('hq')
  for q, e in embeddings.items():
    sides = {'both': e[b]}
    if q != 'hq' and hq is not None:
      sides['probe_vs_hq'] = hq[b]  # degraded probe against a high-quality gallery
    for side, gallery in sides.items():
      sim = np.sum(e[a] * gallery, axis=1)
      acc = metrics.verification_accuracy(sim, same, num_folds=config.eval.num_folds)
      tar, _ = metrics.tar_at_far(sim, same, far=config.eval.far)
      key = q if q == 'hq' else f'{q}px_{side}' if q.isdigit() else f'{q}_{side}'
      table[key] = {**acc, f'tar_at_far_{config.eval.far:g}': tar}
      if rocs is not None:
        rocs[key] = metrics.roc_curve(sim, same)[:2]
  return table


def eval_sets(config) -> list[tuple[str, object, tuple]]:
  """(name, images, (index_a, index_b, same)) of each ``data.eval_pairs`` entry.

  An entry is a pairs CSV over ``data.dir``/images (images: the unique paths) or an
  insightface verification file such as ``agedb_30.bin`` or ``cplfw.bin`` beside a
  training pack (images: its encoded bytes, a0, a1, ..., b0, b1, ...).
  """
  entries = [e.strip() for e in config.data.eval_pairs.split(',') if e.strip()]
  if not entries:
    raise ValueError('config.data.eval_pairs is empty: name a pairs CSV or .bin file')
  sets = []
  for entry in entries:
    path = os.path.join(config.data.dir, entry)
    name = os.path.splitext(os.path.basename(entry))[0]
    if entry.endswith('.bin'):
      b = pairs_lib.read_bin(path)
      n = len(b)
      images = pipeline.EncodedImages(np.concatenate([b.images_a, b.images_b]), path)
      sets.append((name, images, (np.arange(n), np.arange(n, 2 * n), b.same)))
      continue
    p = pairs_lib.read_pairs_csv(path, os.path.join(config.data.dir, 'images'))
    unique, inverse = np.unique(np.concatenate([p.paths_a, p.paths_b]), return_inverse=True)
    n = len(p.paths_a)
    pipeline.validate_images(list(unique))
    sets.append((name, tuple(unique), (inverse[:n], inverse[n:], np.asarray(p.same, bool))))
  return sets


def eval_pairs(config):
  """(images, (index_a, index_b, same)) of the first verification set (``eval_sets``)."""
  return eval_sets(config)[0][1:]


def external_reference(config, paths, pairs) -> dict | None:
  """The external teacher's own HQ verification accuracy, when it covers the pair images."""
  path = os.path.join(config.data.dir, config.data.external_teacher)
  if (not config.data.external_teacher or not os.path.isfile(path)
      or not isinstance(paths, tuple)):  # .bin pairs: not images of data.dir
    return None
  everything = read_folder(config.data.dir, check_files=False)
  row = {p: i for i, p in enumerate(everything.paths)}
  if not all(p in row for p in paths):
    return None
  emb = load_array(path)[[row[p] for p in paths]].astype(np.float64)
  emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return verification_table({'hq': emb}, pairs, config)


def model_report(model, variables, size: int) -> dict:
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  flops = loop.flops_per_example(lambda v, im: model.apply(v, im)['embedding'], variables, x)
  return {'params': loop.count_params(variables['params']['backbone']),
          'gflops_per_image': flops / 1e9}


# ----------------------------------------------------------------------------- orchestration

class Job(stages_lib.StageStates):
  """Builds stages lazily; a student's teacher comes from the teacher stage's checkpoint."""

  known_stages = STAGES

  def __init__(self, config, workdir, recorded: bool = False):
    """``recorded``: the models' sizes come from the workdir's ``data_facts`` (restoring then
    reads no data), else, as in training, from the data."""
    check_config(config)
    self.config, self.workdir = config, workdir
    self.facts = stages_lib.model_facts(workdir) if recorded else {}
    self.mesh = mesh_lib.make_mesh(config.get('mesh'))

  @functools.cached_property
  def train_set(self) -> TrainSet:
    return train_set(with_data_dir(self.config, self.workdir))

  @functools.cached_property
  def num_classes(self) -> int:
    return self.facts.get('num_classes') or self.train_set.num_classes

  @functools.cached_property
  def teacher(self) -> Recognizer:
    return make_model(self.config.teacher.model, self.num_classes,
                      precision.compute_dtype(self.config.train))

  @functools.cached_property
  def student(self) -> Recognizer:
    return make_model(self.config.student.model, self.num_classes,
                      precision.compute_dtype(self.config.train))

  def stage(self, name, restore_only: bool = False, data: bool = True) -> loop.Stage:
    """Builds a stage; ``restore_only``: enough to load its checkpoint (no data when recorded).

    ``data=False``: the stage as training builds it (a student's teacher included) without
    reading data, the sizes it takes from the data from ``self.facts``: no batches, its
    ``batch_spec`` only (bench/bench_steps.py).
    """
    c = self.config
    data = data and not restore_only
    ts = self.train_set if data else None
    if name == 'teacher':
      return teacher_stage(name, self.teacher, c, ts)
    if name not in STAGES:
      raise KeyError(name)
    teacher_vars = None if restore_only else self.variables('teacher')
    external = None
    if STUDENT_VARIANTS[name[len('student_'):]][2]:
      # Without data only the embedding width matters (the projector's shape).
      external = (external_embeddings(c, ts) if data else
                  np.zeros((1, self.facts.get('external_dim') or external_dim(c)), np.float32))
    return student_stage(name, self.student, self.teacher, c, ts, teacher_vars, external)

  def variables(self, name) -> dict:
    """{'params', 'batch_stats'} of a stage's model (a student's without its projector)."""
    s = self.state(name)
    params = s['params'] if name == 'teacher' else s['params']['student']
    return {'params': params, 'batch_stats': s['model_state']}

  def trained_models(self, names, require_all: bool) -> dict:
    out = {}
    for name in names:
      try:
        out[name] = (self.teacher if name == 'teacher' else self.student, self.variables(name))
      except checkpoint.CheckpointError as e:
        if require_all:
          raise
        stages_lib.trained_but_unreadable(e, self.workdir, self.config.reuse_from, name,
                                          self.config.eval.get('partial', False))
    if not out:
      raise checkpoint.CheckpointError(f'no trained teacher or student in {self.workdir}')
    return out

  def score(self, models: dict, prefix: str | None = None) -> dict:
    """Verification table per model; with ``prefix``, also its report PNGs (README)."""
    sets = eval_sets(self.config)
    results, forwards = {}, {}
    for name, (model, variables) in models.items():
      # One compiled forward per architecture: all students share the student's.
      forward = forwards.setdefault(id(model), embedding_fn(model, self.mesh))
      results[name] = {}
      for set_name, images, pairs in sets:
        emb = {q: embed(model, variables, images, self.config, self.mesh, q, forward)
               for q in qualities(self.config)}
        rocs = {}
        table = verification_table(emb, pairs, self.config, rocs)
        # One set: its cells at the top ('hq', '14px_both'); several: 'agedb_30/hq', ...
        cell_prefix = '' if len(sets) == 1 else f'{set_name}/'
        results[name].update({cell_prefix + k: v for k, v in table.items()})
        if prefix is not None:  # all processes (the model runs); process 0 writes the files
          report = prefix if len(sets) == 1 else f'{prefix}_{set_name}'
          self.write_reports(f'{report}_{name}', model, variables, images, rocs)
      results[name].update(model_report(model, variables, self.config.data.image_size))
    _, paths, pairs = sets[0]
    ref = external_reference(self.config, paths, pairs)
    if ref is not None:
      results['external_teacher_embeddings'] = ref
    results['data'] = {'dir': self.config.data.dir, 'pairs': self.config.data.eval_pairs,
                       'num_pairs': int(len(pairs[2])), 'num_images': len(paths)}
    if len(sets) > 1:
      results['data']['sets'] = {n: {'num_pairs': int(len(p[2])), 'num_images': len(i)}
                                 for n, i, p in sets}
    return results

  def write_reports(self, prefix: str, model, variables, paths, rocs: dict) -> None:
    """ROC curves per quality and CBAM spatial attention (per stage) on 4 faces -> reports/."""
    w = self.writer
    reports.save(self.workdir, f'{prefix}_roc', reports.roc_image(
        [f for f, _ in rocs.values()], [t for _, t in rocs.values()], list(rocs), prefix), w)
    faces = reports.probe_faces(paths, self.config.data.eval_pp, pipeline.cache_pp(self.config))
    maps = model.apply(variables, jnp.asarray(faces))['spatial_attention']
    if maps:  # none with model.attention=False
      reports.save(self.workdir, f'{prefix}_cbam_attention', reports.attention_overlay(
          faces, [np.asarray(m, np.float32) for m in maps]), w)


def _trained_names(stage_names) -> list[str]:
  return [s for s in stage_names if s != 'evaluate']


def with_data_dir(config, workdir: str):
  """With no ``data.dir``, the built-in synthetic identities (drawn once into workdir)."""
  if config.data.dir:
    return config
  config = config.copy_and_resolve_references()
  s = config.data.synthetic
  config.data.dir = distributed.process_zero_first(functools.partial(
      synthetic.write_identity_dataset, os.path.join(workdir, 'synthetic_identities'),
      num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids, per_id=s.per_id,
      num_pairs=s.num_pairs, size=s.size, seed=s.seed), 'synthetic_identities')
  logging.info('no data.dir given: using the built-in procedurally drawn identities in %s',
               config.data.dir)
  return config


def check_data(config, workdir: str) -> None:
  """Reads (and so checks) the training rows and the verification pairs before anything trains."""
  names = stages_lib.parse(config.stages, STAGES)
  config = with_data_dir(config, workdir)
  ts = train_set(config)
  if 'student_external' in names:
    external_embeddings(config, ts)
  if 'evaluate' in names:
    eval_pairs(config)


def train_and_evaluate(config, workdir: str) -> dict:
  start = time.perf_counter()
  names = stages_lib.parse(config.stages, STAGES)
  os.makedirs(workdir, exist_ok=True)
  config = with_data_dir(config, workdir)
  job = Job(config, workdir)
  stages_lib.record_facts(workdir, **data_facts(config, job.train_set))  # predict needs no data
  for name in _trained_names(names):
    job.state(name)
  if 'evaluate' not in names:
    return {}
  models = job.trained_models(
      ['teacher'] + [n for n in _trained_names(names) if n != 'teacher'], require_all=True)
  results = job.score(models, 'eval')
  results['stage_seconds'] = stages_lib.seconds(workdir, config.reuse_from, STAGES[:-1])
  results['wall_seconds_this_run'] = time.perf_counter() - start
  log_results(results, job.writer)
  stages_lib.write_results(os.path.join(workdir, 'results.json'), results)
  return results


def trained(config, workdir: str) -> tuple[Job, dict]:
  """(the job, every trained model of ``workdir``: {stage: (model, variables)})."""
  job = Job(config, workdir, recorded=True)
  names = [n for n in STAGES[:-1] if loop.is_done(workdir, n)] or ['teacher']
  return job, job.trained_models(names, require_all=False)


def evaluate(config, workdir: str) -> dict:
  """Scores every trained model of ``workdir`` on ``data.dir``'s ``data.eval_pairs``."""
  if not config.data.dir:
    raise ValueError('--mode=eval needs --config.data.dir (a folder-format dataset with '
                     'the pairs file data.eval_pairs)')
  job, models = trained(config, workdir)
  name = os.path.basename(os.path.normpath(config.data.dir))
  results = job.score(models, f'eval_{name}')
  log_results(results, None)
  results['restored'] = job.restored
  stages_lib.write_results(os.path.join(workdir, f'eval_{name}.json'), results)
  return results


def embedding_head(config, job: Job, models: dict):
  """A predict.Head: per model its unit embedding ([B, D]) and the raw embedding's norm."""
  from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  fns = {}
  for model, _ in models.values():  # one compiled forward per architecture
    fns.setdefault(id(model), jax.jit(
        lambda v, x, m=model: m.apply(v, x)['embedding'].astype(jnp.float32),
        out_shardings=mesh_lib.replicated(job.mesh)))

  def forward(x):
    out = {}
    for name, (model, variables) in models.items():
      e = np.asarray(fns[id(model)](variables, x))
      norm = np.linalg.norm(e, axis=1)
      out[name], out[f'{name}_norm'] = e / np.maximum(norm, 1e-12)[:, None], norm
    return out
  return predict_lib.Head(forward, config.data.image_size,
                          job.facts.get('dataset', config.data.dir), config.data.eval_pp)


def predict_photos(config, workdir: str, input_path: str, output: str,
                   align: str = 'auto') -> dict:
  """Embeddings of new photos by every trained model -> ``<output stem>_<stage>.npy``.

  Rows are L2-normalised (the CSV has each raw embedding's norm), one per CSV row.
  """
  from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  job, models = trained(config, workdir)
  return predict_lib.run(input_path, output, [embedding_head(config, job, models)], job.mesh,
                         config.eval_batch_size, align)


def validated_threshold(config, job: Job, name: str, model, variables) -> tuple[float, str]:
  """(threshold, where it came from): the mean of the 10 folds' best thresholds on the
  verification pairs at full quality, from ``results.json``, else computed on ``data.eval_pairs``."""
  path = os.path.join(job.workdir, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      hq = json.load(f).get(name, {}).get('hq', {})
    if 'threshold' in hq:
      return float(hq['threshold']), f'{path} ({name}, hq)'
  logging.info('%s has no validated threshold for %s: computing it on %s', path, name,
               config.data.eval_pairs)
  config = with_data_dir(config, job.workdir)
  paths, pairs = eval_pairs(config)
  emb = {'hq': embed(model, variables, paths, config, job.mesh, 'hq')}
  where = os.path.join(config.data.dir, config.data.eval_pairs)
  return float(verification_table(emb, pairs, config)['hq']['threshold']), f'{where} (hq)'


def verify(config, workdir: str, input_path: str, align: str = 'auto') -> dict:
  """Cosine similarity of the faces of two photos and the decision at the validated threshold,
  for every trained model of ``workdir``; printed and returned."""
  from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  pair = predict_lib.verify_pair(input_path)
  job, models = trained(config, workdir)
  rows, outputs = predict_lib.score_files(list(pair), [embedding_head(config, job, models)],
                                          job.mesh, config.eval_batch_size, align, 'verify')
  for path, row in zip(pair, rows):
    if row['status'] not in predict_lib.SCORED:
      raise DataError(f'--input {path}: {row["status"]}{": " + row["note"] if row["note"] else ""}'
                      ' (verify needs one face in each photo)')
    if row['status'] == 'several_faces':
      logging.warning('%s: %d faces, comparing the largest', path, row['faces'])
  results = {}
  for name, (model, variables) in models.items():
    threshold, source = validated_threshold(config, job, name, model, variables)
    similarity = float(np.dot(outputs[name][0], outputs[name][1]))
    same = similarity > threshold
    results[name] = {'similarity': similarity, 'threshold': threshold, 'same': bool(same),
                     'threshold_from': source}
    print(f'{name}: cosine similarity {similarity:.4f}, threshold {threshold:.4f} -> '
          f'{"same person" if same else "different people"}')
  return results


def log_results(results: dict, writer) -> None:
  for name, r in results.items():
    if not isinstance(r, dict) or not any(isinstance(v, dict) and 'accuracy' in v
                                          for v in r.values()):
      continue
    cells = '  '.join(f'{q}={v["accuracy"]:.4f}' for q, v in r.items()
                      if isinstance(v, dict) and 'accuracy' in v)
    logging.info('%s: %s', name, cells)
    if writer is not None:
      writer.write_scalars(0, {f'eval/{name}/{q}': v['accuracy'] for q, v in r.items()
                               if isinstance(v, dict) and 'accuracy' in v})
