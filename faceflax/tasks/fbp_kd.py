"""Facial beauty prediction: multi-scale MAE teacher, distilled into an MAE student.

Stages (``config.stages``), each checkpointed under ``<workdir>/<stage>``:
  teacher_pretrain  MAE self-supervision on unlabeled faces (multi-scale stem)
  teacher_finetune  score regression, initialised from teacher_pretrain
  student_pretrain  MAE self-supervision of the smaller plain-ViT student
  student_kd        score loss + alpha * output KD + beta * feature KD from the
                    frozen teacher, whose forward pass runs inside the student's
                    jit-compiled step (one XLA graph)
  evaluate          PC / MAE / RMSE, parameter counts and FLOPs -> results.json
"""
import functools
import os
import time

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from faceflax import config_checks, distributed, losses, metrics, reports
from faceflax.data import align as align_lib, pipeline, sources, synthetic
from faceflax.models import mae
from faceflax.train import checkpoint, loop, mesh as mesh_lib, mixing, optim, precision
from faceflax.train import stages as stages_lib, state as state_lib

STAGES = ('teacher_pretrain', 'teacher_finetune', 'student_pretrain', 'student_kd', 'evaluate')


# ----------------------------------------------------------------------------- models

class FeatureProjector(nn.Module):
  """Maps student tokens to the teacher's width for feature distillation."""
  widths: tuple

  @nn.compact
  def __call__(self, tokens):
    return [nn.Dense(w, name=f'proj{i}')(t) for i, (w, t) in enumerate(zip(self.widths, tokens))]


# ----------------------------------------------------------------------------- data

def labeled_examples(config, split: str, workdir: str):
  """The labeled faces; with no ``data.dir``, the built-in synthetic faces."""
  data_dir = config.data.dir
  if not data_dir:
    s = config.data.synthetic
    data_dir = distributed.process_zero_first(functools.partial(
        synthetic.write_folder_dataset, os.path.join(workdir, 'synthetic_faces'),
        num_train=s.num_train, num_val=s.num_val, num_test=s.num_test, size=s.size,
        seed=s.seed), 'synthetic_faces')
    logging.info('no data.dir given: using the built-in procedurally drawn faces in %s', data_dir)
  fold = config.data.get('cv_fold', 0)
  if not fold:
    return sources.load_examples(data_dir, split, label_columns=('score',),
                                 protocol=config.data.protocol)
  # Cross-validation inside the folder: the fold's rows are scored, the others train.
  everything = sources.load_examples(data_dir, None, label_columns=('score',))
  return sources.select_fold(everything, config.data.cv_column, fold,
                             train=split == config.data.train_split, where=data_dir)


def unlabeled_images(config, workdir: str):
  """Pretraining images: the labeled train split plus the ``data.unlabeled`` datasets
  (folders, record stores or 'tfds:NAME' builds; README "Data at scale")."""
  examples = labeled_examples(config, config.data.train_split, workdir)
  extra = [d.strip() for d in config.data.unlabeled.split(',') if d.strip()]
  if not extra:
    images = examples.images
  else:
    more = sources.list_unlabeled_images(extra, config.data.get('tfds_data_dir', ''))
    images = pipeline.join_images([examples.images, more], drop_repeats=True)
  logging.info('pretraining on %d unlabeled faces', len(images))
  return images


def train_batches(config, images, labels, batch_size, seed):
  return pipeline.train_batches(config, images, labels, batch_size=batch_size,
                                pp=config.data.train_pp, seed=seed)


# ----------------------------------------------------------------------------- stages

def pretrain_stage(name, model, cfg, paths, config) -> loop.Stage:
  size = config.data.image_size

  def init_fn(rng):
    params = mae.init_params(model, rng, size)
    return state_lib.init_state(params, tx)

  tx, sched = optim.adamw(cfg, cfg.steps)

  def loss_fn(params, batch, rng):
    out = model.apply({'params': params}, batch['image'], train=True, method=model.pretrain,
                      rngs={'mask': rng, 'dropout': jax.random.fold_in(rng, 1)})
    return losses.mae_reconstruction(out['pred'], out['target'], out['mask'], cfg.norm_pix), {}

  return loop.Stage(
      name=name, num_steps=cfg.steps, batch_size=cfg.batch_size, init_fn=init_fn,
      update_fn=state_lib.make_update(loss_fn, tx), schedule=sched,
      batches=train_batches(config, paths, {}, cfg.batch_size, config.seed),
      batch_spec=loop.batch_spec(cfg.batch_size, size),
      param_axes=mae.param_axes(model, size), tx=tx)


def finetune_stage(name, model, cfg, examples, pretrained, config) -> loop.Stage:
  """``examples`` None: no batches (a stage built only to load its checkpoint)."""
  size = config.data.image_size

  loaded = {}

  def init_params_fn(rng):
    return load_pretrained(mae.init_params(model, rng, size), pretrained, cfg, loaded)

  template = jax.eval_shape(init_params_fn, jax.random.key(0))  # a misfit fails here
  tx, sched = optim.adamw(cfg, cfg.steps, template,
                          functools.partial(mae.layer_id, depth=model.depth), model.depth + 1)
  init_fn = lambda rng: state_lib.init_state(init_params_fn(rng), tx, ema=bool(cfg.ema_decay))

  def loss_fn(params, batch, rng):
    batch = mix(cfg, batch, rng)
    out = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    return score_terms(model, cfg, out, batch['score'])

  batches = None if examples is None else train_batches(
      config, examples.images, {'score': examples.labels['score']}, cfg.batch_size, config.seed + 1)
  return loop.Stage(
      name=name, num_steps=cfg.steps, batch_size=cfg.batch_size, init_fn=init_fn,
      update_fn=state_lib.make_update(loss_fn, tx, cfg.ema_decay), schedule=sched, batches=batches,
      batch_spec=loop.batch_spec(cfg.batch_size, size, score=()),
      param_axes=mae.param_axes(model, size), tx=tx, loaded=loaded)


def mix(cfg, batch, rng):
  """``cfg.mixup`` > 0: mixup of the batch's faces and scores (``has_label`` multiplied)."""
  if not cfg.mixup:
    return batch
  return mixing.mixup(jax.random.fold_in(rng, 7), batch, cfg.mixup, weight_keys=('has_label',))


def load_pretrained(params, pretrained, cfg, loaded: dict):
  """``params`` with ``pretrained`` = (params, where) loaded strictly (``cfg.reinit``: what
  may keep its init); ``loaded`` gets the facts for the stage's record."""
  if pretrained is None:
    return params
  params, facts = state_lib.load_pretrained(params, pretrained[0], cfg.get('reinit', ''),
                                            where=pretrained[1])
  loaded.update(facts)
  return params


def score_terms(model: mae.MAE, cfg, out, score, weights=None) -> tuple[jax.Array, dict]:
  """Score regression plus ``ld_weight`` * label-distribution KL over the head's bins."""
  terms = {'score_loss': losses.score_regression(out['score'], score, weights, cfg.loss)}
  total = terms['score_loss']
  if cfg.ld_weight:
    centers = jnp.linspace(*model.score_range, model.num_bins)
    terms['ld_kl'] = losses.label_distribution_kl(out['logits'], score, centers, cfg.ld_sigma,
                                                  weights)
    total += cfg.ld_weight * terms['ld_kl']
  if weights is not None:  # a mean over the labeled rows: accumulated by their count
    terms[state_lib.MASKED] = {'labeled': (total, jnp.sum(weights))}
  return total, terms


def pool_tokens(tokens, grid: int):
  """Average-pools a finer square token grid [B, g*g, D] down to [B, grid*grid, D]."""
  g = int(round(tokens.shape[1] ** 0.5))
  f = g // grid
  return einops.reduce(tokens, 'b (h p w q) d -> b (h w) d', 'mean', h=grid, p=f, w=grid, q=f)


def kd_pairs(cfg, student: mae.MAE, teacher: mae.MAE) -> list[tuple[int, int]]:
  """(student_block, teacher_block) pairs of ``feature_pairs``, negative indices resolved.

  ``'s:t,...'``, each index counted from the end when negative; anything else
  raises naming the entry (``check_config`` calls this before any run).
  """
  pairs = []
  for entry in (p.strip() for p in cfg.feature_pairs.split(',')):
    if not entry:
      continue
    parts = entry.split(':')
    if not (len(parts) == 2 and all(i.strip().lstrip('-').isdigit() for i in parts)
            and -student.depth <= int(parts[0]) < student.depth
            and -teacher.depth <= int(parts[1]) < teacher.depth):
      raise ValueError(f'student.kd.feature_pairs={cfg.feature_pairs!r}: {entry!r} is not '
                       f'student_block:teacher_block with blocks in -{student.depth}.. '
                       f'{student.depth - 1} and -{teacher.depth}..{teacher.depth - 1}')
    pairs.append((int(parts[0]) % student.depth, int(parts[1]) % teacher.depth))
  return pairs


def output_kd(cfg, s_out, t_out) -> jax.Array:
  """'kl': temperature KL over the score bins; 'score': squared error to the teacher's score.

  'score' treats the teacher's prediction as the label (pseudo-labels on unlabeled
  faces); 'kl' also matches the shape of the bin distribution, which only carries
  knowledge when the teacher was trained with the label-distribution term.
  """
  if cfg.output_kd == 'score':
    return losses.score_regression(s_out['score'], t_out['score'], None, 'mse')
  return losses.distillation_kl(s_out['logits'], t_out['logits'], cfg.temperature)


def kd_stage(name, student, teacher, cfg, examples, unlabeled, pretrained, teacher_params,
             config) -> loop.Stage:
  """Student step with the frozen teacher's forward pass inside (one XLA graph).

  ``examples`` None: no batches (a stage built only to load its checkpoint, or to time its
  step). Each batch holds ``cfg.unlabeled_batch_size`` unlabeled faces after the labeled
  ones (``unlabeled``: their images; never empty, they include the labeled train faces).
  """
  size = config.data.image_size
  pairs = kd_pairs(cfg, student, teacher)  # check_config has checked the grids
  projector = FeatureProjector(tuple(teacher.width for _ in pairs))

  loaded = {}

  def init_params_fn(rng):
    params = load_pretrained(mae.init_params(student, rng, size), pretrained, cfg, loaded)
    tokens = [jnp.zeros((1, teacher.grid ** 2, student.width))] * len(pairs)
    return {'student': params,
            'projector': projector.init(jax.random.fold_in(rng, 3), tokens)['params']}

  def kd_layer_id(path):  # the projector trains at the head's rate
    if path.startswith('student/'):
      return mae.layer_id(path[len('student/'):], student.depth)
    return student.depth + 1

  template = jax.eval_shape(init_params_fn, jax.random.key(0))
  tx, sched = optim.adamw(cfg, cfg.steps, template, kd_layer_id, student.depth + 1)
  init_fn = lambda rng: state_lib.init_state(init_params_fn(rng), tx, ema=bool(cfg.ema_decay))

  def loss_fn(params, batch, rng, teacher_params):
    batch = mix(cfg, batch, rng)  # the teacher scores the mixed faces too (function matching)
    images = batch['image']
    t_out = teacher.apply({'params': jax.lax.stop_gradient(teacher_params)}, images)
    s_out = student.apply({'params': params['student']}, images, train=True,
                          rngs={'dropout': rng})
    total, terms = score_terms(student, cfg, s_out, batch['score'], batch['has_label'])
    if cfg.alpha:
      terms['output_kd'] = output_kd(cfg, s_out, t_out)
      total += cfg.alpha * terms['output_kd']
    if cfg.beta and pairs:
      tokens = [pool_tokens(s_out['hidden'][s], teacher.grid) for s, _ in pairs]
      projected = projector.apply({'params': params['projector']}, tokens)
      terms['feature_kd'] = sum(losses.feature_distillation(p, t_out['hidden'][t])
                                for p, (_, t) in zip(projected, pairs)) / len(pairs)
      total += cfg.beta * terms['feature_kd']
    return total, terms

  batch_size = cfg.batch_size + cfg.unlabeled_batch_size
  return loop.Stage(
      name=name, num_steps=cfg.steps, batch_size=batch_size, init_fn=init_fn,
      update_fn=state_lib.make_update(loss_fn, tx, cfg.ema_decay), schedule=sched,
      batches=None if examples is None else kd_batches(cfg, examples, unlabeled, config),
      batch_spec=loop.batch_spec(batch_size, size, score=(), has_label=()),
      consts=(teacher_params,), tx=tx, loaded=loaded,
      param_axes={'student': mae.param_axes(student, size),
                  'projector': jax.tree.map(lambda _: jax.sharding.PartitionSpec(),
                                            template['projector'])})


def kd_batches(cfg, examples, unlabeled, config):
  """start_step -> batches of ``cfg.batch_size`` labeled faces, then (if any) unlabeled ones."""
  score = examples.labels['score']
  labeled = train_batches(config, examples.images, {'score': score, 'has_label': np.ones_like(score)},
                          cfg.batch_size, config.seed + 2)
  extra = None
  if cfg.unlabeled_batch_size:
    zeros = np.zeros(len(unlabeled), np.float32)
    extra = train_batches(config, unlabeled, {'score': zeros, 'has_label': zeros},
                          cfg.unlabeled_batch_size, config.seed + 3)

  def batches(start_step):
    # Labeled faces carry the score loss; unlabeled ones only the KD terms.
    it = labeled(start_step=start_step)
    if extra is None:
      yield from it
      return
    for a, b in zip(it, extra(start_step=start_step)):
      yield {k: np.concatenate([a[k], b[k]]) for k in a}
  return batches


# ----------------------------------------------------------------------------- evaluation

def score_fn(model, flip_tta: bool):
  """``(params, images) -> scores``; ``flip_tta`` averages each face with its mirror image.

  Both views are faces the model was trained on (``flip_lr`` augments training), and
  their errors partly cancel (README "Results: facial beauty prediction"). It doubles the
  forward passes per scored face; the reported MFLOPs / image are one pass.
  """
  def scores(params, images):
    out = model.apply({'params': params}, images)['score']
    if flip_tta:
      out = (out + model.apply({'params': params}, images[:, :, ::-1])['score']) / 2
    return out
  return scores


def predict_scores(model, params, examples, config, mesh) -> tuple[np.ndarray, np.ndarray]:
  """(predicted, true) scores of every example exactly once, gathered over processes.

  The padded final batch is dropped by its mask, so no example is lost or
  counted twice whatever the batch size and process count.
  """
  bs = config.eval_batch_size
  mesh_lib.check_batch_size(bs, 'eval_batch_size')
  forward = jax.jit(score_fn(model, config.eval.flip_tta), out_shardings=mesh_lib.replicated(mesh))
  ds = pipeline.make_eval_dataset(examples.images, {'score': examples.labels['score']},
                                  batch_size=bs, pp=config.data.eval_pp,
                                  cache_pp=pipeline.cache_pp(config),
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), progress='evaluate')
  preds, targets = [], []
  for batch in ds:
    batch = mesh_lib.put_batch(batch, mesh)
    pred = np.asarray(forward(params, batch['image']))
    target, mask = (np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
                    for k in ('score', 'mask'))
    preds.append(pred[mask])
    targets.append(target[mask])
  return np.concatenate(preds), np.concatenate(targets)


def model_report(model, params, size: int) -> dict:
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  flops = loop.flops_per_example(lambda p, im: model.apply({'params': p}, im)['score'], params, x)
  return {'params': loop.count_params(params), 'mflops_per_image': flops / 1e6}


def score_models(models: dict, examples, config, mesh, keep: dict | None = None) -> dict:
  """Metrics per model; ``keep`` (if given) receives each model's (pred, target)."""
  out = {}
  for who, (model, params) in models.items():
    pred, target = predict_scores(model, params, examples, config, mesh)
    if keep is not None:
      keep[who] = (pred, target)
    out[who] = {**metrics.regression_report(pred, target),
                **model_report(model, params, config.data.image_size)}
  return out


# ----------------------------------------------------------------------------- orchestration

def parse_stages(config) -> list[str]:
  return stages_lib.parse(config.stages, STAGES)


def check_config(config) -> None:
  """Inconsistent settings, before any data is read or step compiled (``app.run`` calls it)."""
  parse_stages(config)
  fold = config.data.get('cv_fold', 0)
  if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
    raise ValueError(f'data.cv_fold={fold!r}: expected 0 (off) or a fold number >= 1')
  teacher, student = (mae.from_config(config[who].model, config.data.image_size)
                      for who in ('teacher', 'student'))
  config_checks.check_mae(teacher, 'teacher.model')
  config_checks.check_mae(student, 'student.model')
  if student.width > teacher.width or student.depth > teacher.depth:
    raise ValueError(f'student.model (width {student.width}, depth {student.depth}) must be no '
                     f'wider and no deeper than teacher.model (width {teacher.width}, depth '
                     f'{teacher.depth}): the student is the distilled, smaller model')
  kd = config.student.kd
  for where, cfg in (('teacher.finetune', config.teacher.finetune), ('student.kd', kd)):
    if not 0 <= cfg.ema_decay < 1:
      raise ValueError(f'{where}.ema_decay={cfg.ema_decay!r}: expected 0 (off) or in (0, 1)')
    if cfg.mixup < 0:
      raise ValueError(f'{where}.mixup={cfg.mixup!r}: expected 0 (off) or a Beta alpha > 0')
  pairs = kd_pairs(kd, student, teacher)
  if kd.output_kd not in ('kl', 'score'):
    raise ValueError(f"student.kd.output_kd={kd.output_kd!r}: expected 'kl' or 'score'")
  if kd.beta and pairs and student.grid % teacher.grid:
    raise ValueError(f'feature KD needs the student token grid ({student.grid}x{student.grid}) '
                     f'to be a multiple of the teacher grid ({teacher.grid}x{teacher.grid}); '
                     'check the models\' patch sizes')


def check_data(config, workdir: str) -> None:
  """Reads (and so checks) every split the listed stages use, before the first one trains."""
  names, kd = parse_stages(config), config.student.kd
  labeled_examples(config, config.data.train_split, workdir)
  if 'evaluate' in names:
    labeled_examples(config, config.data.eval_split, workdir)
  if {'teacher_pretrain', 'student_pretrain'} & set(names) or kd.unlabeled_batch_size:
    unlabeled_images(config, workdir)


class Job(stages_lib.JobWriter):
  """Builds each stage lazily; a stage's inputs come from earlier stages' checkpoints."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.mesh = mesh_lib.make_mesh(config.get('mesh'))
    size, dtype = config.data.image_size, precision.compute_dtype(config.train)
    self.teacher = mae.from_config(config.teacher.model, size, dtype)
    self.student = mae.from_config(config.student.model, size, dtype)
    self._cache = {}

  def stage(self, name, restore_only: bool = False, data: bool = True) -> loop.Stage:
    """Builds a stage; ``restore_only`` skips its inputs and data (enough to load its checkpoint).

    Restoring reads no data, so a trained workdir predicts without its dataset.
    ``data=False``: the stage as training builds it (the teacher and pretrained weights
    included) without reading data: no batches, its ``batch_spec`` only (bench/bench_steps.py).
    """
    c, w = self.config, self.workdir
    data = data and not restore_only
    upstream = (lambda n: None) if restore_only else self.params
    if name == 'teacher_pretrain':
      st = pretrain_stage(name, self.teacher, c.teacher.pretrain, self.unlabeled if data else (), c)
      st.on_log = self._reconstruction_logger(self.teacher, c.teacher.pretrain, name)
      return st
    if name == 'student_pretrain':
      return pretrain_stage(name, self.student, c.student.pretrain,
                            self.unlabeled if data else (), c)
    train = labeled_examples(c, c.data.train_split, w) if data else None
    if name == 'teacher_finetune':
      pretrained = self._pretrained('teacher_pretrain', c.teacher.finetune, restore_only)
      return finetune_stage(name, self.teacher, c.teacher.finetune, train, pretrained, c)
    if name == 'student_kd':
      kd = c.student.kd
      pretrained = self._pretrained('student_pretrain', kd, restore_only)
      unlabeled = self.unlabeled if kd.unlabeled_batch_size and data else ()
      return kd_stage(name, self.student, self.teacher, kd, train, unlabeled, pretrained,
                      upstream('teacher_finetune'), c)
    raise KeyError(name)

  def _pretrained(self, name, cfg, restore_only):
    """(params, where) of stage ``name`` when ``cfg.from_pretrained`` (restoring loads none)."""
    if restore_only or not cfg.from_pretrained:
      return None
    where = stages_lib.stage_dir(self.workdir, self.config.reuse_from, name)
    return self.params(name), where

  @functools.cached_property
  def unlabeled(self):
    """Pretraining images, listed once per job (several stages use them)."""
    return unlabeled_images(self.config, self.workdir)

  def provide(self, name, params):
    """Uses ``params`` as the result of stage ``name`` (benchmarks, notebooks)."""
    self._cache[name] = params

  def params(self, name):
    """Final params of a stage: run it if it is listed, else load its checkpoint."""
    if name not in self._cache:
      if name in parse_stages(self.config) and not loop.is_done(self.workdir, name):
        self._cache[name] = state_lib.trained_params(loop.run(
            self.stage(name), self.workdir, self.config.train, self.mesh, self.writer))
      else:
        st = self.stage(name, restore_only=True)
        self._cache[name] = state_lib.trained_params(stages_lib.load_state(
            self.workdir, self.config.reuse_from, name, st.init_fn, self.mesh, self.restored))
    return self._cache[name]

  def models(self, require_all: bool = True) -> dict:
    """The trained teacher and student; for --mode=eval, whichever of them exist."""
    out = {}
    for who, model, stage in (('teacher', self.teacher, 'teacher_finetune'),
                              ('student', self.student, 'student_kd')):
      try:
        params = self.params(stage)
      except checkpoint.CheckpointError as e:
        if require_all:
          raise
        stages_lib.trained_but_unreadable(e, self.workdir, self.config.reuse_from, stage,
                                          self.config.eval.get('partial', False))
        continue
      out[who] = (model, params['student'] if who == 'student' else params)
    if not out:
      raise checkpoint.CheckpointError(f'no trained teacher or student in {self.workdir}')
    return out

  def _reconstruction_logger(self, model, cfg, name):
    """Writes MAE reconstructions (masked input | prediction | original) to TensorBoard."""
    every = max(self.config.train.image_every, 1)
    probe = None

    def on_log(state, step):
      nonlocal probe
      if step % every and step != cfg.steps:
        return
      if probe is None:
        probe = reports.probe_faces(self.unlabeled, self.config.data.eval_pp,
                                    pipeline.cache_pp(self.config))
      out = model.apply({'params': state['params']}, jnp.asarray(probe), method=model.pretrain,
                        rngs={'mask': jax.random.key(step)})
      grid = reports.reconstruction_grid(out, model.patch, cfg.norm_pix)
      self.writer.write_images(step, {f'{name}/reconstruction': grid})
      # the latest one as a PNG (README "Use a trained model"); process 0 writes it
      reports.save(self.workdir, f'{name}_reconstruction', np.concatenate(list(grid), 0))
    return on_log


def train_and_evaluate(config, workdir: str) -> dict:
  start = time.perf_counter()
  stages = parse_stages(config)
  os.makedirs(workdir, exist_ok=True)
  # The data folder's name picks --mode=predict's alignment template; recorded, predict needs no data.
  stages_lib.record_facts(workdir, dataset=align_lib.folder_name(config.data.dir))
  job = Job(config, workdir)
  for name in stages:
    if name != 'evaluate':
      job.params(name)
  if 'evaluate' not in stages:
    return {}
  examples = labeled_examples(config, config.data.eval_split, workdir)
  preds = {}
  results = score_models(job.models(), examples, config, job.mesh, preds)
  _write_reports(workdir, preds, 'eval', job.writer)
  results['student_teacher_param_ratio'] = results['student']['params'] / results['teacher']['params']
  results['data'] = {'dir': config.data.dir or 'built-in synthetic faces',
                     'eval_split': config.data.eval_split, 'n': len(examples),
                     'cv_fold': config.data.get('cv_fold', 0)}
  results['stage_seconds'] = stages_lib.seconds(workdir, config.reuse_from, STAGES[:-1])
  results['pretrained'] = stages_lib.loaded(workdir, config.reuse_from, STAGES[:-1])
  results['wall_seconds_this_run'] = time.perf_counter() - start
  log_results(results, job.writer)
  stages_lib.write_results(os.path.join(workdir, 'results.json'), results)
  return results


def evaluate(config, workdir: str) -> dict:
  """Scores the trained teacher and student of ``workdir`` on ``data.dir`` / ``eval.split``."""
  if not config.data.dir:
    raise ValueError('--mode=eval needs --config.data.dir (a folder-format or official dataset)')
  job = Job(stages_lib.restore_only(config), workdir)  # load, never train
  examples = labeled_examples(config, config.eval.split, workdir)
  preds = {}
  results = score_models(job.models(require_all=False), examples, config, job.mesh, preds)
  name = os.path.basename(os.path.normpath(config.data.dir))
  _write_reports(workdir, preds, f'eval_{name}', job.writer)
  results['data'] = {'dir': config.data.dir, 'split': config.eval.split, 'n': len(examples)}
  results['restored'] = job.restored
  stages_lib.write_results(os.path.join(workdir, f'eval_{name}.json'), results)
  log_results(results, None)
  return results


def predict_photos(config, workdir: str, input_path: str, output: str, align: str = 'auto') -> dict:
  """Beauty scores of the teacher and student of ``workdir`` for new photos -> CSV."""
  from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  job = Job(stages_lib.restore_only(config), workdir)  # load, never train
  models = job.models(require_all=False)
  fns = {who: jax.jit(score_fn(model, config.eval.flip_tta),
                      out_shardings=mesh_lib.replicated(job.mesh))
         for who, (model, _) in models.items()}
  dataset = stages_lib.model_facts(workdir).get('dataset', config.data.dir)  # data need not be here
  head = predict_lib.Head(lambda x: {f'{w}_score': fns[w](p, x) for w, (_, p) in models.items()},
                          config.data.image_size, dataset, config.data.eval_pp)
  return predict_lib.run(input_path, output, [head], job.mesh, config.eval_batch_size, align)


def _write_reports(workdir, preds, prefix, writer):
  """Predicted-vs-true beauty scatter per model -> <workdir>/reports/<prefix>_<who>_scatter.png."""
  for who, (pred, target) in preds.items():
    reports.save(workdir, f'{prefix}_{who}_scatter',
                 reports.scatter(pred, target, f'{who}: predicted vs true beauty ({prefix})'), writer)


def log_results(results: dict, writer) -> None:
  """The scores in the log and (with a writer) in TensorBoard."""
  for who in ('teacher', 'student'):
    if who not in results:
      continue
    r = results[who]
    logging.info('%s: PC=%.4f MAE=%.4f RMSE=%.4f  params=%d  MFLOPs/img=%.1f  (n=%d)', who,
                 r['pc'], r['mae'], r['rmse'], r['params'], r['mflops_per_image'], r['n'])
    if writer is not None:
      writer.write_scalars(0, {f'eval/{who}_{k}': r[k] for k in ('pc', 'mae', 'rmse')})
