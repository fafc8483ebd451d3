"""Low-quality face recognition by knowledge distillation (ResNeXt-CBAM, ArcFace).

Stages (``config.stages``), each checkpointed under ``<workdir>/<stage>``:
  teacher            ArcFace on high-quality faces
  student_<variant>  ArcFace on degraded faces made on the fly in tf.data, plus KD from
                     the frozen teacher, which sees the high-quality view of the same
                     image inside the student's jit-compiled step (one XLA graph).
                     Variants: nokd, output, attention, both, external (output KD from a
                     pretrained teacher outside faceflax: its precomputed embeddings, or one
                     of ``faceflax.teachers`` run on the high-quality views and cached; then
                     also on the faces of ``data.unlabeled``, which have no identities)
  evaluate           10-fold verification accuracy and TAR@FAR at each image quality,
                     for both-sides-degraded and degraded-probe-vs-HQ-gallery pairs
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from faceflax import external_teacher, losses, reports, teachers, verification
from faceflax.data import align as align_lib, identities, pipeline, sources, synthetic
from faceflax.models import resnext_cbam
from faceflax.train import job as job_lib, loop, optim, stages as stages_lib, state as state_lib

# variant: (output KD, attention KD, external teacher)
STUDENT_VARIANTS = {
    'nokd': (False, False, False),
    'output': (True, False, False),
    'attention': (False, True, False),
    'both': (True, True, False),
    'external': (True, False, True),
}


# ----------------------------------------------------------------------------- data

def train_set(config) -> identities.TrainSet:
  d = config.data
  return identities.read_train_set(d.dir, d.identity_column, d.train_split, d.drop_noisy)


def external_path(config) -> str:
  """The external teacher's embeddings: one .npy row per labels.csv row of data.dir."""
  return os.path.join(config.data.dir, config.data.external_teacher)


def runs_teacher(config) -> bool:
  """Whether ``data.external_teacher`` names a teacher the project runs (else a .npy file)."""
  return teachers.is_teacher(config.data.external_teacher)


def external_dim(config) -> int:
  if runs_teacher(config):
    return teachers.dim(config.data.external_teacher)
  return identities.embedding_width(external_path(config))


def data_facts(config, ts: identities.TrainSet) -> dict:
  """What the models take from the training data (``stages.record_facts``): the ArcFace
  classes, the external teacher's width (if it has one) and the folder name that picks
  predict's alignment template."""
  facts = {'num_classes': ts.num_classes, 'dataset': align_lib.folder_name(config.data.dir)}
  if config.data.external_teacher and (runs_teacher(config) or os.path.isfile(external_path(config))):
    facts['external_dim'] = external_dim(config)
  return facts


def distill_set(config, ts: identities.TrainSet):
  """(images, labels) of the external teacher's KD: the identity train set, then the train
  faces of ``data.unlabeled`` with label -1 (no ArcFace term)."""
  extra = [d.strip() for d in config.data.unlabeled.split(',') if d.strip()]
  if not extra:
    return ts.examples.images, ts.labels
  more = sources.list_unlabeled_images(extra, config.data.tfds_data_dir)
  logging.info('external-teacher KD on %d identity faces + %d unlabeled faces (%s)',
               len(ts.labels), len(more), config.data.unlabeled)
  return (pipeline.join_images([ts.examples.images, more]),
          np.concatenate([ts.labels, np.full(len(more), -1, np.int32)]))


def teacher_embeddings(config, workdir, images, **kwargs) -> np.ndarray:
  """``data.external_teacher``'s embeddings of ``images`` (``external_teacher.embeddings``;
  ``kwargs``: the views), cached in ``data.teacher_cache`` (default: beside the workdir)."""
  d = config.data
  return external_teacher.embeddings(
      d.external_teacher, images, workdir, cache=d.teacher_cache,
      mirror_average=d.teacher_mirror_average, workers=d.teacher_workers,
      batch_size=config.eval_batch_size, **kwargs)


def train_batches(config, images, labels: dict, batch_size: int, seed: int, *, degraded: bool):
  # Degrade first: the later ops (flip, value range) then act on both views alike.
  pp = f'{config.data.degrade}|{config.data.train_pp}' if degraded else config.data.train_pp
  return pipeline.train_batches(config, images, labels, batch_size=batch_size, pp=pp, seed=seed)


# ----------------------------------------------------------------------------- stages

def _apply_train(model, variables, images, rng):
  out, new = model.apply(variables, images, train=True, rngs={'dropout': rng},
                         mutable=['batch_stats'])
  return out, new['batch_stats']


def _arcface_terms(out, labels, arc) -> tuple[jax.Array, dict]:
  """ArcFace over the rows with an identity (label >= 0; unlabeled faces have -1)."""
  labels = labels.astype(jnp.int32)
  known = (labels >= 0).astype(jnp.float32)
  labels = jnp.maximum(labels, 0)
  loss = losses.arcface(out['cosine'], labels, arc.scale, arc.margin, weights=known)
  accuracy = losses.masked_mean(jnp.argmax(out['cosine'], -1) == labels, known)
  return loss, {'arcface': loss, 'train_accuracy': accuracy}


def teacher_stage(model, config) -> loop.Stage:
  cfg, arc, size = config.teacher.train, config.teacher.arcface, config.data.image_size
  tx, sched = optim.adamw(cfg, cfg.steps)

  def init_fn(rng):
    v = resnext_cbam.init_variables(model, rng, size)
    return state_lib.init_state(v['params'], tx, v['batch_stats'])

  def loss_fn(params, batch, rng, model_state):
    out, model_state = _apply_train(model, {'params': params, 'batch_stats': model_state},
                                    batch['image'], rng)
    loss, terms = _arcface_terms(out, batch['label'], arc)
    return loss, (terms, model_state)

  return loop.train_stage('teacher', cfg, (tx, sched), init_fn, loss_fn, size, {'label': ()})


def student_stage(name, student, teacher, config, teacher_vars,
                  external_dim: int = 0) -> loop.Stage:
  """ArcFace on degraded faces + alpha * output KD + beta * attention KD, one jit step.

  ``external_dim``: the width of the external teacher's embeddings (``student_external``).
  """
  variant = name[len('student_'):]
  use_output, use_attention, use_external = STUDENT_VARIANTS[variant]
  cfg, arc, kd, size = config.student.train, config.student.arcface, config.student.kd, config.data.image_size
  alpha = kd.alpha if use_output else 0.0
  beta = kd.beta if use_attention else 0.0
  maps = [m.strip() for m in kd.maps.split(',') if m.strip()]  # check_config checked them
  s_dim = student.backbone.embed_dim
  target_dim = (external_dim if use_external
                else teacher.backbone.embed_dim if alpha and kd.output == 'embedding' else s_dim)
  # The student's embedding is projected only where widths differ: a student as wide as
  # its external teacher learns the teacher's embedding itself, the one it verifies with.
  projector = nn.Dense(target_dim, name='projector') if target_dim != s_dim else None

  def init_params(rng):
    v = resnext_cbam.init_variables(student, rng, size)
    params = {'student': v['params']}
    if projector is not None:
      params['projector'] = projector.init(jax.random.fold_in(rng, 1), jnp.zeros((1, s_dim)))['params']
    return params, v['batch_stats']

  tx, sched = optim.adamw(cfg, cfg.steps)
  labels = {'image_lq': (size, size, 3), 'label': ()}  # what a batch holds beside 'image'
  if use_external:
    labels['teacher_embedding'] = (external_dim,)

  def init_fn(rng):
    params, batch_stats = init_params(rng)
    return state_lib.init_state(params, tx, batch_stats)

  def loss_fn(params, batch, rng, teacher_vars, model_state):
    s_out, model_state = _apply_train(
        student, {'params': params['student'], 'batch_stats': model_state}, batch['image_lq'], rng)
    arcface, terms = _arcface_terms(s_out, batch['label'], arc)
    total = arcface if variant == 'nokd' else kd.arcface * arcface
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
        if kd.relational:
          terms['relational_kd'] = losses.similarity_distillation(emb, target)
          total += alpha * kd.relational * terms['relational_kd']
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

  return loop.train_stage(name, cfg, (tx, sched), init_fn, loss_fn, size, labels,
                          consts=(teacher_vars,))


# ----------------------------------------------------------------------------- evaluation

def check_config(config) -> None:
  """Inconsistent settings, before any data is read or step compiled (``app.run`` calls it)."""
  names = stages_lib.parse(config.stages, Job.known_stages())
  kd = config.student.kd
  unknown = {m.strip() for m in kd.maps.split(',') if m.strip()} - {'channel', 'spatial'}
  if unknown:
    raise ValueError(f'student.kd.maps: unknown map kind(s) {sorted(unknown)}; known: channel, spatial')
  if kd.output not in ('embedding', 'logits'):
    raise ValueError(f"student.kd.output={kd.output!r}: expected 'embedding' or 'logits'")
  verification.qualities(config)
  if config.data.unlabeled and not runs_teacher(config):
    raise ValueError(f'data.unlabeled={config.data.unlabeled!r} needs an external teacher the '
                     f'project runs (data.external_teacher one of {sorted(teachers.TEACHERS)}, '
                     f'not {config.data.external_teacher!r}): a .npy has rows of data.dir only')
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


def model_report(model, variables, size: int) -> dict:
  flops = loop.flops_per_image(lambda v, im: model.apply(v, im)['embedding'], variables, size)
  return {'params': loop.count_params(variables['params']['backbone']),
          'gflops_per_image': flops / 1e9}


def with_data_dir(config, workdir: str):
  """With no ``data.dir``, the built-in synthetic identities (drawn once into workdir)."""
  if config.data.dir:
    return config
  config = config.copy_and_resolve_references()
  config.data.dir = synthetic.built_in('identities', workdir, config.data.synthetic.to_dict())
  return config



# ----------------------------------------------------------------------------- the job

class Job(job_lib.Job):
  """Builds stages lazily; a student's teacher comes from the teacher stage's checkpoint.

  The ArcFace classes and the external teacher's width come from the data when training,
  from the workdir's recorded ``data_facts`` when restoring (which then reads no data).
  """

  STAGES = ('teacher', *(f'student_{v}' for v in STUDENT_VARIANTS))
  check_config = staticmethod(check_config)

  def __init__(self, config, workdir, restore_only: bool = False):
    super().__init__(config, workdir, restore_only)
    self.facts = stages_lib.model_facts(workdir) if restore_only else {}

  @staticmethod
  def data_reads(config, workdir):
    data = functools.cache(lambda: with_data_dir(config, workdir))
    ts = functools.cache(lambda: train_set(data()))
    reads = dict.fromkeys(Job.STAGES, ts)

    def external():
      if runs_teacher(data()):  # the package, before any stage trains; then its faces
        teachers.TEACHERS[data().data.external_teacher]()
        return distill_set(data(), ts())
      return identities.row_embeddings(external_path(data()), data().data.dir, ts().rows)
    reads['student_external'] = external
    reads['evaluate'] = lambda: verification.eval_pairs(data())
    return reads

  @functools.cached_property
  def data_config(self):
    """The config with its data.dir (the built-in synthetic identities when none is given)."""
    return with_data_dir(self.config, self.workdir)

  @functools.cached_property
  def train_set(self) -> identities.TrainSet:
    return train_set(self.data_config)

  def record_facts(self):
    stages_lib.record_facts(self.workdir, **data_facts(self.data_config, self.train_set))

  @functools.cached_property
  def num_classes(self) -> int:
    return self.facts.get('num_classes') or self.train_set.num_classes

  def _model(self, who: str) -> resnext_cbam.Recognizer:
    return resnext_cbam.recognizer(self.config[who].model, self.num_classes, self.dtype)

  @functools.cached_property
  def teacher(self) -> resnext_cbam.Recognizer:
    return self._model('teacher')

  @functools.cached_property
  def student(self) -> resnext_cbam.Recognizer:
    return self._model('student')

  def build(self, name, upstream):
    c = self.config
    if name == 'teacher':
      return teacher_stage(self.teacher, c)
    output_kd, attention_kd, external = STUDENT_VARIANTS[name[len('student_'):]]
    # Only students that learn from the faceflax teacher need it (trained or restored).
    own_teacher = (output_kd and not external) or attention_kd
    teacher_vars = self.variables('teacher') if upstream and own_teacher else None
    width = (self.facts.get('external_dim') or external_dim(self.data_config)) if external else 0
    return student_stage(name, self.student, self.teacher, c, teacher_vars, width)

  def batches(self, name):
    c, ts = self.data_config, self.train_set
    if name == 'teacher':
      return train_batches(c, ts.examples.images, {'label': ts.labels},
                           c.teacher.train.batch_size, c.seed, degraded=False)
    images, labels = ts.examples.images, {'label': ts.labels}
    if STUDENT_VARIANTS[name[len('student_'):]][2]:
      if runs_teacher(c):
        images, labels['label'] = distill_set(c, ts)
        emb = teacher_embeddings(c, self.workdir, images)
      else:
        emb = identities.row_embeddings(external_path(c), c.data.dir, ts.rows)
      labels['teacher_embedding'] = external_teacher.centred(emb) if c.student.kd.external_centre else emb
    return train_batches(c, images, labels, c.student.train.batch_size, c.seed + 1,
                         degraded=True)

  def variables(self, name) -> dict:
    """{'params', 'batch_stats'} of a stage's model (a student's without its projector)."""
    s = self.state(name)
    params = s['params'] if name == 'teacher' else s['params']['student']
    return {'params': params, 'batch_stats': s['model_state']}

  def trained_models(self) -> dict:
    """{stage: (model, variables)}: training scores the teacher and the listed students;
    restoring, every finished stage (the teacher if none)."""
    if self.restore_only:
      names = [n for n in self.STAGES if self.finished(n)] or ['teacher']
    else:  # the teacher also when reused from another workdir
      names = [n for n in self.listed() if n != job_lib.EVALUATE]
      if 'teacher' not in names and self.finished('teacher'):
        names.insert(0, 'teacher')
    states = self.trained_states(names, require_all=not self.restore_only)
    return {name: (self.teacher if name == 'teacher' else self.student, self.variables(name))
            for name in states}

  def evaluate(self, split, prefix):
    del split  # the verification pairs are data.eval_pairs
    return self.score(self.trained_models(), prefix)

  def score(self, models: dict, prefix: str | None = None) -> dict:
    """Verification table per model; with ``prefix``, also its report PNGs (README)."""
    c = self.data_config
    sets = verification.eval_sets(c)
    results, forwards = {}, {}
    for name, (model, variables) in models.items():
      # One compiled forward per architecture: all students share the student's.
      forward = forwards.setdefault(id(model), verification.embedding_fn(model, self.mesh))

      def reports_of(set_name, images, rocs, name=name, model=model, variables=variables):
        if prefix is not None:  # all processes (the model runs); process 0 writes the files
          report = prefix if len(sets) == 1 else f'{prefix}_{set_name}'
          self.write_reports(f'{report}_{name}', model, variables, images, rocs)
      results[name] = verification.score_model(model, variables, sets, c, self.mesh, forward,
                                                reports_of)
      results[name].update(model_report(model, variables, c.data.image_size))
    _, paths, pairs = sets[0]
    if runs_teacher(c):
      results.update(self.score_external_teacher(sets))
    else:
      ref = verification.external_reference(c, paths, pairs)
      if ref is not None:
        results['external_teacher_embeddings'] = ref
    results['data'] = verification.data_summary(c, sets)
    return results

  def score_external_teacher(self, sets) -> dict:
    """{'external_teacher': its verification cells}, on the views the students see at each
    quality (resized to its input); {} without its package (a warning): the students
    are scored and served without it."""
    c = self.data_config
    try:
      teacher = teachers.TEACHERS[c.data.external_teacher]()
    except teachers.TeacherUnavailable as e:
      logging.warning('not scoring the external teacher: %s', e)
      return {}
    cells = verification.score_embeddings(
        lambda images, q: teacher_embeddings(
            c, self.workdir, images, teacher=teacher, cache_pp=pipeline.cache_pp(c),
            view_pp=verification.quality_pp(q, c.data.image_size, ''),
            image_key='image' if q == 'hq' else 'image_lq'), sets, c)
    return {'external_teacher': {**cells, 'identity': teacher.identity}}

  def write_reports(self, prefix: str, model, variables, paths, rocs: dict) -> None:
    """ROC curves per quality and CBAM spatial attention (per stage) on 4 faces -> reports/."""
    w = self.writer
    reports.save(self.workdir, f'{prefix}_roc', reports.roc_image(
        [f for f, _ in rocs.values()], [t for _, t in rocs.values()], list(rocs), prefix), w)
    reports.save_attention(  # none with model.attention=False
        self.workdir, f'{prefix}_cbam_attention',
        lambda faces: model.apply(variables, jnp.asarray(faces))['spatial_attention'], paths,
        self.config, w)

  def embedding_head(self, models: dict):
    """A predict.Head: per model its unit embedding ([B, D]) and the raw embedding's norm."""
    from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top  # TensorFlow
    fns = {}
    for model, _ in models.values():  # one compiled forward per architecture
      fns.setdefault(id(model), job_lib.replicated_jit(
          lambda v, x, m=model: m.apply(v, x)['embedding'].astype(jnp.float32), self.mesh))

    def forward(x):
      out = {}
      for name, (model, variables) in models.items():
        e = np.asarray(fns[id(model)](variables, x))
        norm = np.linalg.norm(e, axis=1)
        out[name], out[f'{name}_norm'] = e / np.maximum(norm, 1e-12)[:, None], norm
      return out
    c = self.config
    return predict_lib.Head(forward, c.data.image_size, self.facts.get('dataset', c.data.dir),
                            c.data.eval_pp)

  def predict_heads(self):
    """Embeddings of every trained model -> ``<output stem>_<stage>.npy``: rows L2-normalised
    (the CSV has each raw embedding's norm), one per CSV row."""
    return [self.embedding_head(self.trained_models())], None

  def threshold(self, name: str, models: dict) -> tuple[float, str]:
    """``verification.validated_threshold`` of model ``name``."""
    return verification.validated_threshold(self.data_config, self.workdir, name, *models[name],
                                            self.mesh)

  @classmethod
  def run_verify(cls, config, workdir: str, input_path: str, align: str = 'auto') -> dict:
    """Whether the faces of two photos are one person, by every trained model of ``workdir``."""
    job = cls(config, workdir, restore_only=True)
    models = job.trained_models()
    return verification.verify_photos(input_path, job.embedding_head(models),
                                      functools.partial(job.threshold, models=models), job.mesh,
                                      config.eval_batch_size, align)

  @staticmethod
  def log_results(results: dict, writer) -> None:
    for name, r in results.items():
      if not isinstance(r, dict) or not any(isinstance(v, dict) and 'accuracy' in v
                                            for v in r.values()):
        continue
      cells = {q: v['accuracy'] for q, v in r.items() if isinstance(v, dict) and 'accuracy' in v}
      logging.info('%s: %s', name, '  '.join(f'{q}={a:.4f}' for q, a in cells.items()))
      job_lib.log_scalars(writer, {f'eval/{name}/{q}': a for q, a in cells.items()})
