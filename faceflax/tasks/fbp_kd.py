"""Facial beauty prediction: multi-scale MAE teacher, distilled into an MAE student.

Stages (``config.stages``), each checkpointed under ``<workdir>/<stage>``:
  teacher_pretrain  MAE self-supervision on unlabeled faces (multi-scale stem)
  teacher_finetune  score regression, initialised from teacher_pretrain
  student_pretrain  MAE self-supervision of the smaller plain-ViT student
  student_kd        score loss + alpha * output KD + beta * feature KD from the
                    frozen teacher, whose forward pass runs inside the student's
                    jit-compiled step (one XLA graph); optionally also the score
                    of a second, external teacher (``student.kd.external``)
  evaluate          PC / MAE / RMSE, parameter counts and FLOPs -> results.json
"""
import functools
import os

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from faceflax import backbones, config_checks, external_teacher, losses, metrics, probes, reports
from faceflax import teachers
from faceflax.data import align as align_lib, pipeline, sources, synthetic
from faceflax.models import heads, mae
from faceflax.train import evaluation, job as job_lib, loop, mesh as mesh_lib, mixing, optim
from faceflax.train import stages as stages_lib, state as state_lib

# ----------------------------------------------------------------------------- data

def labeled_examples(config, split: str, workdir: str):
  """The labeled faces; with no ``data.dir``, the built-in synthetic faces."""
  data_dir = config.data.dir
  if not data_dir:
    data_dir = synthetic.built_in('faces', workdir, config.data.synthetic.to_dict())
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


def external_embeddings(config, workdir: str, images) -> np.ndarray:
  """``student.kd.external.teacher``'s embeddings of the decoded faces (cached)."""
  ext = config.student.kd.external
  return external_teacher.embeddings(ext.teacher, images, workdir, cache=ext.cache,
                                     mirror_average=ext.mirror_average, workers=ext.workers,
                                     batch_size=config.eval_batch_size)


def external_regressor(config, workdir: str, train) -> probes.KernelRidge:
  """The external teacher's beauty score: RBF kernel ridge from its embedding of each
  labeled train face to the face's score, (gamma, lambda) by exact leave-one-out error.

  A pretrained face embedding carries what the MAE teacher, trained on a few thousand
  faces, misses: on SCUT-FBP5500's folds their scores' errors are nearly independent
  (``results/fbp_scut_cv/README.md``, "Recipe probes"; README "An external teacher for the
  beauty student").
  """
  ext = config.student.kd.external
  regressor = probes.kernel_ridge_select(external_embeddings(config, workdir, train.images),
                                         train.labels['score'], ext.gammas, ext.lambdas)
  logging.info('external teacher %s: leave-one-out PC %.3f on the %d train faces', ext.teacher,
               np.corrcoef(regressor.loo_predictions, train.labels['score'])[0, 1], len(train))
  return regressor


# ----------------------------------------------------------------------------- stages

def pretrain_stage(name, model, cfg, config) -> loop.Stage:
  size = config.data.image_size

  def init_fn(rng):
    params = mae.init_params(model, rng, size)
    return state_lib.init_state(params, tx)

  tx, sched = optim.adamw(cfg, cfg.steps)

  def loss_fn(params, batch, rng):
    out = model.apply({'params': params}, batch['image'], train=True, method=model.pretrain,
                      rngs={'mask': rng, 'dropout': jax.random.fold_in(rng, 1)})
    return losses.mae_reconstruction(out['pred'], out['target'], out['mask'], cfg.norm_pix), {}

  return loop.train_stage(name, cfg, (tx, sched), init_fn, loss_fn, size,
                          param_axes=mae.param_axes(model, size))


def finetune_stage(name, model, cfg, pretrained, config) -> loop.Stage:
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

  return loop.train_stage(name, cfg, (tx, sched), init_fn, loss_fn, size, {'score': ()},
                          param_axes=mae.param_axes(model, size), loaded=loaded)


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


def kd_stage(name, student, teacher, cfg, pretrained, teacher_params, config) -> loop.Stage:
  """Student step with the frozen teacher's forward pass inside (one XLA graph).

  Each batch (``kd_batches``) holds ``cfg.unlabeled_batch_size`` unlabeled faces after the
  labeled ones; with ``cfg.external.teacher`` every face also has the external teacher's
  score (``external_score``), which the student regresses with weight ``cfg.external.weight``,
  and its centred embedding (``external_embedding``), which a linear map of the student's
  pooled tokens learns with weight ``cfg.external.embedding_weight`` (cosine).
  """
  size = config.data.image_size
  external = bool(cfg.external.teacher)
  embed_dim = teachers.dim(cfg.external.teacher) if external else 0
  pairs = kd_pairs(cfg, student, teacher)  # check_config has checked the grids
  projector = heads.TokenProjector(tuple(teacher.width for _ in pairs))
  embedder = nn.Dense(embed_dim) if cfg.external.embedding_weight else None

  loaded = {}

  def init_params_fn(rng):
    params = load_pretrained(mae.init_params(student, rng, size), pretrained, cfg, loaded)
    tokens = [jnp.zeros((1, teacher.grid ** 2, student.width))] * len(pairs)
    params = {'student': params,
              'projector': projector.init(jax.random.fold_in(rng, 3), tokens)['params']}
    if embedder:
      pooled = jnp.zeros((1, student.width))
      params['embedder'] = embedder.init(jax.random.fold_in(rng, 4), pooled)['params']
    return params

  def kd_layer_id(path):  # the projector and embedder train at the head's rate
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
    if external:
      terms['external_kd'] = losses.score_regression(s_out['score'], batch['external_score'],
                                                     None, 'mse')
      total += cfg.external.weight * terms['external_kd']
    if embedder:
      emb = embedder.apply({'params': params['embedder']}, s_out['pooled'])
      terms['external_embedding_kd'] = losses.embedding_distillation(
          emb, batch['external_embedding'], kind='cosine')
      total += cfg.external.embedding_weight * terms['external_embedding_kd']
    return total, terms

  labels = {'score': (), 'has_label': ()}
  if external:
    labels['external_score'] = ()
  if embedder:
    labels['external_embedding'] = (embed_dim,)
  axes = {'student': mae.param_axes(student, size),
          **{k: mesh_lib.unsplit_axes(v) for k, v in template.items() if k != 'student'}}
  return loop.train_stage(
      name, cfg, (tx, sched), init_fn, loss_fn, size, labels,
      batch_size=cfg.batch_size + cfg.unlabeled_batch_size, consts=(teacher_params,),
      loaded=loaded, param_axes=axes)


def kd_batches(cfg, examples, unlabeled, config, external=None):
  """start_step -> batches of ``cfg.batch_size`` labeled faces, then (if any) unlabeled ones
  (``unlabeled``: their images; never empty, they include the labeled train faces).
  ``external``: the external teacher's labels (``Job._external_labels``) of the labeled
  and of the unlabeled faces."""
  score = examples.labels['score']
  labels = {'score': score, 'has_label': np.ones_like(score)}
  if external is not None:
    labels.update(external[0])
  labeled = train_batches(config, examples.images, labels, cfg.batch_size, config.seed + 2)
  extra = None
  if cfg.unlabeled_batch_size:
    zeros = np.zeros(len(unlabeled), np.float32)
    labels = {'score': zeros, 'has_label': zeros}
    if external is not None:
      labels.update(external[1])
    extra = train_batches(config, unlabeled, labels, cfg.unlabeled_batch_size, config.seed + 3)

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
  """(predicted, true) scores of every example exactly once, in order."""
  forward = job_lib.replicated_jit(score_fn(model, config.eval.flip_tta), mesh)
  pred = evaluation.predict_images(forward, params, examples.images, config, mesh)
  return pred, np.asarray(examples.labels['score'], np.float32)


def model_report(model, params, size: int) -> dict:
  flops = loop.flops_per_image(lambda p, im: model.apply({'params': p}, im)['score'], params,
                               size)
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


# ----------------------------------------------------------------------------- config

def check_config(config) -> None:
  """Inconsistent settings, before any data is read or step compiled (``app.run`` calls it)."""
  stages = stages_lib.parse(config.stages, Job.known_stages())
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
  if kd.init_from and 'student_pretrain' in stages:
    raise ValueError(f'student.kd.init_from={kd.init_from!r} replaces the student_pretrain stage: '
                     f'leave that stage out of config.stages ({config.stages!r})')
  if kd.init_from and not kd.from_pretrained:
    raise ValueError(f'student.kd.init_from={kd.init_from!r} needs student.kd.from_pretrained')
  pairs = kd_pairs(kd, student, teacher)
  ext = kd.external
  if ext.teacher and ext.teacher not in teachers.TEACHERS:
    raise ValueError(f'student.kd.external.teacher={ext.teacher!r}: expected \'\' (off) or one '
                     f'of {sorted(teachers.TEACHERS)}')
  if ext.embedding_weight and not ext.teacher:
    raise ValueError(f'student.kd.external.embedding_weight={ext.embedding_weight!r} needs '
                     'student.kd.external.teacher (the embedding it distils)')
  if (min(ext.weight, ext.embedding_weight) < 0 or not ext.gammas or not ext.lambdas
      or min(*ext.gammas, *ext.lambdas) <= 0):
    raise ValueError(f'student.kd.external: weight {ext.weight!r} and embedding_weight '
                     f'{ext.embedding_weight!r} must be >= 0 and gammas '
                     f'{ext.gammas!r}, lambdas {ext.lambdas!r} non-empty and positive')
  if kd.output_kd not in ('kl', 'score'):
    raise ValueError(f"student.kd.output_kd={kd.output_kd!r}: expected 'kl' or 'score'")
  if kd.beta and pairs and student.grid % teacher.grid:
    raise ValueError(f'feature KD needs the student token grid ({student.grid}x{student.grid}) '
                     f'to be a multiple of the teacher grid ({teacher.grid}x{teacher.grid}); '
                     'check the models\' patch sizes')


# ----------------------------------------------------------------------------- the job

class Job(job_lib.Job):
  """Builds each stage lazily; a stage's inputs come from earlier stages' checkpoints."""

  STAGES = ('teacher_pretrain', 'teacher_finetune', 'student_pretrain', 'student_kd')
  check_config = staticmethod(check_config)

  def __init__(self, config, workdir, restore_only: bool = False):
    super().__init__(config, workdir, restore_only)
    size = config.data.image_size
    self.teacher = mae.from_config(config.teacher.model, size, self.dtype)
    self.student = mae.from_config(config.student.model, size, self.dtype)

  @staticmethod
  def data_reads(config, workdir):
    kd = config.student.kd
    train = functools.cache(lambda: labeled_examples(config, config.data.train_split, workdir))
    unlabeled = functools.cache(lambda: unlabeled_images(config, workdir))
    kd_images = (lambda: (train(), unlabeled())) if kd.unlabeled_batch_size else train

    def kd_reads():  # the external teacher's embeddings are computed (and cached) up front
      kd_images()
      if kd.external.teacher:
        external_embeddings(config, workdir, train().images)
        if kd.unlabeled_batch_size:
          external_embeddings(config, workdir, unlabeled())
    reads = {'teacher_pretrain': unlabeled, 'student_pretrain': unlabeled,
             'teacher_finetune': train, 'student_kd': kd_reads,
             'evaluate': lambda: labeled_examples(config, config.data.eval_split, workdir)}
    return reads

  def record_facts(self):
    # The data folder's name picks --mode=predict's alignment template: predict needs no data.
    stages_lib.record_facts(self.workdir, dataset=align_lib.folder_name(self.config.data.dir))

  def build(self, name, upstream):
    c = self.config
    if name == 'teacher_pretrain':
      st = pretrain_stage(name, self.teacher, c.teacher.pretrain, c)
      st.on_log = self._reconstruction_logger(self.teacher, c.teacher.pretrain, name)
      return st
    if name == 'student_pretrain':
      return pretrain_stage(name, self.student, c.student.pretrain, c)
    if name == 'teacher_finetune':
      pretrained = self._pretrained('teacher_pretrain', c.teacher.finetune, upstream)
      return finetune_stage(name, self.teacher, c.teacher.finetune, pretrained, c)
    kd = c.student.kd
    pretrained = self._pretrained('student_pretrain', kd, upstream)
    teacher = self.params('teacher_finetune') if upstream else None
    return kd_stage(name, self.student, self.teacher, kd, pretrained, teacher, c)

  def batches(self, name):
    c = self.config
    if name in ('teacher_pretrain', 'student_pretrain'):
      cfg = c.teacher.pretrain if name == 'teacher_pretrain' else c.student.pretrain
      return train_batches(c, self.unlabeled, {}, cfg.batch_size, c.seed)
    train = labeled_examples(c, c.data.train_split, self.workdir)
    if name == 'teacher_finetune':
      return train_batches(c, train.images, {'score': train.labels['score']},
                           c.teacher.finetune.batch_size, c.seed + 1)
    kd = c.student.kd
    unlabeled = self.unlabeled if kd.unlabeled_batch_size else ()
    external = self._external_labels(train, unlabeled) if kd.external.teacher else None
    return kd_batches(kd, train, unlabeled, c, external)

  def _external_labels(self, train, unlabeled) -> tuple[dict, dict | None]:
    """The external teacher's score and centred embedding of the labeled and the unlabeled
    KD faces (centred over both sets together)."""
    score = external_regressor(self.config, self.workdir, train)
    # score.x: the train faces' embeddings it was fitted on (not looked up a second time)
    sets = [score.x] + ([external_embeddings(self.config, self.workdir, unlabeled)]
                        if len(unlabeled) else [])
    labels = [{'external_score': score(x).astype(np.float32)} for x in sets]
    if self.config.student.kd.external.embedding_weight:  # only carried when distilled
      centred = np.split(external_teacher.centred(np.concatenate(sets)), [len(score.x)])
      for label, e in zip(labels, centred):
        label['external_embedding'] = e
    return labels[0], labels[1] if len(labels) > 1 else None

  def _pretrained(self, name, cfg, upstream):
    """(params, where) of stage ``name`` when ``cfg.from_pretrained`` (restoring loads none)."""
    if not upstream or not cfg.from_pretrained:
      return None
    if name == 'student_pretrain' and cfg.init_from:
      where = os.path.normpath(cfg.init_from)
      params = backbones.stage_mae_params(*os.path.split(where), self.mesh,
                                          'student.kd.init_from')[0]
      return params, where
    where = stages_lib.stage_dir(self.workdir, self.config.reuse_from, name)
    return self.params(name), where

  @functools.cached_property
  def unlabeled(self):
    """Pretraining images, listed once per job (several stages use them)."""
    return unlabeled_images(self.config, self.workdir)

  def params(self, name):
    """Final params of a stage (its weight average where it kept one)."""
    return state_lib.trained_params(self.state(name))

  def models(self, require_all: bool = True) -> dict:
    """The trained teacher and student; for --mode=eval, whichever of them exist."""
    states = self.trained_states(['teacher_finetune', 'student_kd'], require_all)
    out = {}
    if 'teacher_finetune' in states:
      out['teacher'] = (self.teacher, state_lib.trained_params(states['teacher_finetune']))
    if 'student_kd' in states:
      out['student'] = (self.student, state_lib.trained_params(states['student_kd'])['student'])
    return out

  def evaluate(self, split, prefix):
    c = self.config
    examples = labeled_examples(c, split, self.workdir)
    preds = {}
    results = score_models(self.models(require_all=not self.restore_only), examples, c, self.mesh,
                           preds)
    for who, (pred, target) in preds.items():  # process 0 writes
      reports.save(self.workdir, f'{prefix}_{who}_scatter', reports.scatter(
          pred, target, f'{who}: predicted vs true beauty ({prefix})'), self.writer)
    if {'teacher', 'student'} <= set(results):
      results['student_teacher_param_ratio'] = (results['student']['params']
                                                / results['teacher']['params'])
    if c.student.kd.external.teacher and not self.restore_only:
      results.update(self.score_external(examples, preds))
    results['data'] = {'dir': c.data.dir or 'built-in synthetic faces', 'split': split,
                       'n': len(examples), 'cv_fold': c.data.get('cv_fold', 0)}
    return results

  def score_external(self, examples, preds: dict) -> dict:
    """The external teacher's scores of the evaluated faces, alone and averaged with the
    MAE teacher's (what the student is distilled from). Its regressor is refitted on the
    train faces (deterministic; their embeddings are cached)."""
    c = self.config
    score = external_regressor(c, self.workdir, labeled_examples(c, c.data.train_split,
                                                                 self.workdir))
    pred = score(external_embeddings(c, self.workdir, examples.images))
    target = np.asarray(examples.labels['score'], np.float32)
    out = {'external_teacher': {**metrics.regression_report(pred, target),
                                'gamma': score.gamma, 'lambda': score.lam}}
    if 'teacher' in preds:
      out['teacher_and_external'] = metrics.regression_report((preds['teacher'][0] + pred) / 2,
                                                              target)
    return out

  def predict_heads(self):
    """Beauty scores of the teacher and the student."""
    from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top  # TensorFlow
    c = self.config
    models = self.models(require_all=False)
    fns = {who: job_lib.replicated_jit(score_fn(model, c.eval.flip_tta), self.mesh)
           for who, (model, _) in models.items()}
    # The recorded dataset name picks the alignment template: the data need not be here.
    dataset = stages_lib.model_facts(self.workdir).get('dataset', c.data.dir)
    head = predict_lib.Head(lambda x: {f'{w}_score': fns[w](p, x) for w, (_, p) in models.items()},
                            c.data.image_size, dataset, c.data.eval_pp)
    return [head], None

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

  @staticmethod
  def log_results(results: dict, writer) -> None:
    """The scores in the log and (with a writer) in TensorBoard."""
    for who in ('teacher', 'student'):
      if who not in results:
        continue
      r = results[who]
      logging.info('%s: PC=%.4f MAE=%.4f RMSE=%.4f  params=%d  MFLOPs/img=%.1f  (n=%d)', who,
                   r['pc'], r['mae'], r['rmse'], r['params'], r['mflops_per_image'], r['n'])
      job_lib.log_scalars(writer, {f'eval/{who}_{k}': r[k] for k in ('pc', 'mae', 'rmse')})
