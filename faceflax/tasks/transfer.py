"""Transfer benchmark: any pretrained MAE ViT backbone of this repo on downstream face tasks.

The backbone is the MAE params of a finished stage (``backbone.workdir``/``backbone.stage``,
newest checkpoint; ``params['mae']``, ``params['student']`` or the params themselves), or a
random init when ``backbone.workdir`` is empty (the scratch baseline). Features are the
mean-pooled final encoder tokens of the unmasked image.

For each task of ``config.tasks`` (see ``TASKS``), each protocol of ``config.protocols``:
  linear    features of every train and val face, standardised with train statistics;
            closed-form ridge regression, lambda by exact leave-one-out error on the fitted
            rows (regression), or an L-BFGS-fitted multinomial / independent logistic
            regression (classification / multilabel); val metrics
  fewshot   the same probe on a seeded class-balanced (classification) or uniform
            (multilabel, regression) subset of the train rows; mean and std over seeds.
            The features keep the statistics of the whole train split (no labels used)
  finetune  backbone + fresh Dense head trained with the task loss as stage
            ``finetune_<task>`` (checkpointed and resumed like every stage), scored on val
-> ``<workdir>/results.json`` {task: {protocol: {metric: value, ..., n_train, n_val}},
   'backbone': {...}, 'seconds': {...}} and a table in the log and ``results.md``.
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
import optax
from absl import logging

from faceflax import config_checks, metrics, probes, reports
from faceflax.data import align as align_lib, pipeline, records
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, drop_bad_rows, read_folder
from faceflax.models import mae
from faceflax.train import checkpoint, evaluation, loop, mesh as mesh_lib, optim, precision
from faceflax.train import stages as stages_lib, state as state_lib

KINDS = ('classification', 'multilabel', 'regression')
PROTOCOLS = ('linear', 'fewshot', 'finetune')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One downstream task: where its data is, what it predicts and how it is scored."""
  data: str                    # folder-format dataset under config.data.root
  columns: tuple[str, ...]     # label columns; () = every +1/-1 column of labels.csv
  kind: str                    # one of KINDS
  metric: str                  # primary metric, a key of score()'s result
  higher_is_better: bool
  num_classes: int = 0         # classification only
  loss: str = 'mse'            # regression only: 'mse' | 'l1'
  class_names: tuple[str, ...] = ()  # classification: the name of each class (--mode=predict)


TASKS = {
    'expression': TaskSpec('fer2013', ('label',), 'classification', 'accuracy', True,
                           num_classes=7, class_names=('angry', 'disgust', 'fear', 'happy', 'sad',
                                                       'surprise', 'neutral')),
    'attributes': TaskSpec('celeba_id', (), 'multilabel', 'mean_accuracy', True),
    'age': TaskSpec('utkface', ('age',), 'regression', 'mae', False, loss='l1'),
    'beauty': TaskSpec('scut_fbp5500', ('score',), 'regression', 'pc', True, loss='mse'),
}
# Never attributes, even when a dataset happens to hold only +1/-1 in them.
NOT_ATTRIBUTES = ('filename', 'identity', 'id_noisy', 'split', 'n_faces_detected')


def stage_name(task: str) -> str:
  return f'finetune_{task}'


def parse_names(value: str, known, key: str) -> list[str]:
  names = [s.strip() for s in str(value).split(',') if s.strip()]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise ValueError(f'{key}={value!r}: unknown or no names {unknown}; known: '
                     f'{", ".join(known)}')
  return list(dict.fromkeys(names))


def check_config(config) -> None:
  """Rejects unknown names and bad settings before any data is read or step compiled."""
  parse_names(config.protocols, PROTOCOLS, 'protocols')
  for name in parse_names(config.tasks, list(TASKS), 'tasks'):
    spec = TASKS[name]
    if spec.kind not in KINDS or (spec.kind == 'regression' and spec.loss not in ('mse', 'l1')):
      raise ValueError(f'TASKS[{name!r}]: kind {spec.kind!r} / loss {spec.loss!r} unknown')
  if config.fewshot.seeds < 1:
    raise ValueError(f'fewshot.seeds={config.fewshot.seeds}: must be >= 1')
  if config.backbone.workdir and not config.backbone.stage:
    raise ValueError('backbone.workdir is set but backbone.stage is empty')
  config_checks.check_mae(make_backbone(config), 'backbone.model')


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class TaskData:
  """A task's train and val faces with model-ready targets."""
  name: str
  spec: TaskSpec
  dir: str
  columns: tuple[str, ...]
  train: Examples
  val: Examples
  y_train: np.ndarray  # int class (classification), [N, K] 0/1 (multilabel), float (regression)
  y_val: np.ndarray

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.spec.class_names or tuple(str(i) for i in range(self.spec.num_classes))

  @property
  def out_dim(self) -> int:
    if self.spec.kind == 'classification':
      return self.spec.num_classes
    return len(self.columns) if self.spec.kind == 'multilabel' else 1


def task_dir(config, name: str) -> str:
  """The dataset of task ``name``: ``data.dirs.<name>`` (a folder or store under
  ``data.root``, an absolute path, or 'tfds:NAME[/CONFIG]')."""
  return records.dataset_path(config.data.dirs.get(name, TASKS[name].data), config.data.root,
                              config.data.get('tfds_data_dir', ''))


def attribute_columns(examples: Examples) -> tuple[str, ...]:
  """Label columns holding only +1 / -1 (CelebA's attribute convention), in csv order."""
  return tuple(k for k, v in examples.labels.items()
               if k not in NOT_ATTRIBUTES and v.dtype != object and len(v)
               and np.isin(v, (-1, 1)).all())


def known_classes(spec: TaskSpec, examples: Examples, where: str) -> Examples:
  """A classification task's examples whose class is one of 0..num_classes-1 (unknown: bad examples)."""
  if spec.kind != 'classification':
    return examples
  column, n = spec.columns[0], spec.num_classes
  whys = [None if v == round(v) and 0 <= v < n else f'column {column!r}: {v:g}'
          for v in examples.labels[column]]
  return drop_bad_rows(examples, whys, where, f'unknown class(es), not in 0..{n - 1}')


def _targets(spec: TaskSpec, examples: Examples, columns) -> np.ndarray:
  values = np.stack([examples.labels[c] for c in columns], axis=1).astype(np.float64)
  if spec.kind == 'regression':
    return values[:, 0].astype(np.float32)
  if spec.kind == 'multilabel':
    return (values > 0).astype(np.float32)  # +1/-1 -> 1/0
  return values[:, 0].astype(np.int32)  # known_classes checked them


def _subset(examples: Examples, limit: int, seed: int) -> Examples:
  """A fixed random subset of ``limit`` rows, kept in file order (0 = all)."""
  if not limit or limit >= len(examples):
    return examples
  return examples.select(np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit]))


def load_task(config, name: str) -> TaskData:
  spec, d = TASKS[name], config.data
  root = task_dir(config, name)
  where = os.path.join(root, 'labels.csv')
  train = known_classes(spec, read_folder(root, d.train_split, label_columns=spec.columns), where)
  columns = spec.columns or attribute_columns(train)
  if not columns:
    raise DataError(f'{where}: task {name!r} found no +1/-1 attribute columns')
  val = known_classes(spec, read_folder(root, d.eval_split, label_columns=columns), where)
  train, val = _subset(train, d.max_train, config.seed), _subset(val, d.max_val, config.seed)
  data = TaskData(name, spec, root, columns, train, val, _targets(spec, train, columns),
                  _targets(spec, val, columns))
  logging.info('%s: %s, %d train / %d val faces, %d label column(s) (%s)', name, root,
               len(train), len(val), len(columns), spec.kind)
  return data


# ----------------------------------------------------------------------------- backbone

def make_backbone(config) -> mae.MAE:
  return mae.from_config(config.backbone.model, config.backbone.image_size,
                           precision.compute_dtype(config.train))


def select_mae_params(params) -> tuple[dict, str]:
  """The MAE params of a stage's params and their layout ('mae', 'student' or 'plain')."""
  for key in ('mae', 'student'):  # face-prior pretraining / fbp_kd student_kd
    if key in params:
      return params[key], key
  return params, 'plain'


def load_backbone(config, mesh) -> tuple[mae.MAE, dict, dict]:
  """(model, MAE params, report); a model that does not fit the checkpoint is an error."""
  b = config.backbone
  model = make_backbone(config)
  params = mae.init_params(model, jax.random.key(config.seed), b.image_size)  # eager: cached ops
  report = {'workdir': b.workdir, 'stage': b.stage if b.workdir else '',
            'model': b.model.to_dict(), 'image_size': b.image_size, 'feature_dim': model.width,
            'encoder_params': loop.count_params(
                {k: v for k, v in params.items() if k in ('embed', 'encoder')})}
  if not b.workdir:
    logging.info('backbone: no backbone.workdir, a randomly initialised %s (scratch baseline)',
                 b.model.variant)
    return model, mesh_lib.put_replicated(params, mesh), {**report, 'layout': 'scratch',
                                                          'step': 0}
  directory = os.path.join(b.workdir, b.stage, 'ckpt')
  if not loop.is_done(b.workdir, b.stage):
    logging.warning('backbone: stage %s of %s is not finished; using its newest checkpoint',
                    b.stage, b.workdir)
  step, state = checkpoint.load_raw(directory, mesh_lib.replicated(mesh), 'backbone')
  if not isinstance(state, dict) or 'params' not in state:
    raise checkpoint.CheckpointError(f'backbone: {directory} holds no train state with params')
  pretrained, layout = select_mae_params(state['params'])
  try:
    params, loaded = state_lib.load_pretrained(params, pretrained, b.reinit,
                                               where=f'{directory} step {step}')
  except state_lib.PretrainedMismatch as e:
    raise checkpoint.CheckpointError(
        f'backbone: backbone.model ({b.model.to_dict()}, image_size {b.image_size}) does not '
        f'match the {layout!r} params: {e} Set --config.backbone.model.* like the stage\'s '
        'model config.') from None
  logging.info('backbone: %s params of %s step %d; %d weight(s) left at init (%s)',
               layout, directory, step, len(loaded['kept_init']), b.reinit)
  params = mesh_lib.put_replicated(params, mesh)
  return model, params, {**report, 'layout': layout, 'step': int(step), 'loaded': loaded}


# ----------------------------------------------------------------------------- features

def predict(forward, params, examples: Examples, config, mesh) -> np.ndarray:
  """``forward(params, images)`` of every example exactly once, in order."""
  return evaluation.predict_all(forward, params, examples.images, mesh,
                                batch_size=config.eval_batch_size, pp=config.data.eval_pp,
                                cache_pp=pipeline.cache_pp(config))


def feature_fn(model: mae.MAE, mesh):
  """Jitted (params, images) -> mean-pooled final encoder tokens, unmasked."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x)['pooled'],
                 out_shardings=mesh_lib.replicated(mesh))


# ----------------------------------------------------------------------------- probes

def fit_probe(data: TaskData, x, cfg, rows=None) -> tuple[np.ndarray, np.ndarray, dict]:
  """The task's linear probe on standardised train features ``x`` (``rows`` of them).

  Returns (w, b, the chosen regularisation).
  """
  y = data.y_train
  if data.spec.kind == 'regression':
    if rows is not None:
      x, y = x[rows], y[rows]
    w, b, lam = probes.ridge_select(x, y, cfg.ridge_lambda)
    return w, b, {'ridge_lambda': lam}
  w, b = probes.logistic_fit(x, y, data.spec.kind, data.out_dim, cfg.l2, cfg.max_steps,
                             cfg.tol, rows)
  return w, b, {'l2': cfg.l2}


# ----------------------------------------------------------------------------- scoring

def decode(kind: str, outputs, stats=(0.0, 1.0)) -> np.ndarray:
  """Head / probe outputs -> predictions: class, 0/1 per output, or de-standardised value."""
  outputs = np.asarray(outputs, np.float64)
  if kind == 'classification':
    return outputs.argmax(-1)
  if kind == 'multilabel':
    return (outputs > 0).astype(np.float32)
  mean, sd = stats
  return outputs.reshape(len(outputs), -1)[:, 0] * sd + mean


def score(spec: TaskSpec, pred, y) -> dict:
  if spec.kind == 'classification':
    return {'accuracy': metrics.accuracy(pred, y)}
  if spec.kind == 'multilabel':
    return {'mean_accuracy': float(np.mean(np.asarray(pred) == np.asarray(y)))}
  report = metrics.regression_report(pred, y)
  report.pop('n')
  return report


def target_stats(data: TaskData) -> tuple[float, float]:
  """Train mean and sd: the head regresses standardised targets; (0, 1) for other kinds."""
  if data.spec.kind != 'regression':
    return 0.0, 1.0
  return float(np.mean(data.y_train)), float(np.std(data.y_train) + 1e-6)


def head_facts(data: TaskData) -> dict:
  """What a fine-tuned head takes from its training data (``stages.record_facts``), so that
  predicting needs only the workdir: its width, label columns, class names, the train mean
  and sd its regression outputs are decoded with, and the folder name that picks predict's
  alignment template."""
  mean, sd = target_stats(data)
  names = list(data.class_names) if data.spec.kind == 'classification' else []
  return {'out_dim': data.out_dim, 'columns': list(data.columns), 'class_names': names,
          'target_mean': mean, 'target_sd': sd, 'dataset': align_lib.folder_name(data.dir)}


def linear_probe(data: TaskData, x_train, x_val, cfg, rows=None) -> tuple[dict, dict, np.ndarray]:
  """Fits on the train features (``rows`` of them).

  Returns (val scores, the chosen regularisation, val predictions).
  """
  w, b, reg = fit_probe(data, x_train, cfg, rows)
  pred = decode(data.spec.kind, x_val @ w + b)
  return score(data.spec, pred, data.y_val), reg, pred


def train_prior(data: TaskData) -> dict:
  """The val score of always predicting the train majority / mean (a floor for the table)."""
  y, n = data.y_train, len(data.val)
  if data.spec.kind == 'classification':
    pred = np.full(n, np.bincount(y).argmax())
  elif data.spec.kind == 'multilabel':
    pred = np.tile(y.mean(0) > 0.5, (n, 1)).astype(np.float32)
  else:
    pred = np.full(n, y.mean())  # constant: metrics.pearson gives PC 0
  return score(data.spec, pred, data.y_val)


def fewshot_probe(data: TaskData, x_train, x_val, cfg) -> tuple[dict, np.ndarray]:
  """Mean, std and per-seed values of every metric over ``cfg.fewshot.seeds`` draws.

  Also returns the val predictions of the first draw (its report picture).
  """
  f, runs, regs, sizes, preds = cfg.fewshot, [], [], [], []
  for seed in range(f.seeds):
    rows = probes.fewshot_indices(data.y_train, seed, data.spec.kind, f.per_class, f.fraction)
    scores, reg, pred = linear_probe(data, x_train, x_val, cfg.linear, rows)
    preds.append(pred)
    runs.append(scores)
    regs.append(reg)
    sizes.append(len(rows))
  out = {}
  for k in runs[0]:
    values = [r[k] for r in runs]
    out.update({k: float(np.mean(values)), f'{k}_std': float(np.std(values)),
                f'{k}_per_seed': values})
  out.update({f'{k}_per_seed': [r[k] for r in regs] for k in regs[0]})
  return {**out, 'n_train': int(np.mean(sizes)), 'seeds': f.seeds}, preds[0]


# ----------------------------------------------------------------------------- fine-tuning

def head_module(out_dim: int) -> nn.Dense:
  return nn.Dense(out_dim, kernel_init=nn.initializers.zeros, name='head')


def finetune_forward(model: mae.MAE, out_dim: int, params, images, train=False, rng=None):
  rngs = {'dropout': rng} if rng is not None else {}
  pooled = model.apply({'params': params['backbone']}, images, train=train, rngs=rngs)['pooled']
  return head_module(out_dim).apply({'params': params['head']}, pooled)


def task_loss(kind: str, loss: str, outputs, target) -> jax.Array:
  if kind == 'classification':
    return optax.softmax_cross_entropy_with_integer_labels(
        outputs, target.astype(jnp.int32)).mean()
  if kind == 'multilabel':
    return optax.sigmoid_binary_cross_entropy(outputs, target).mean()
  err = outputs[:, 0] - target
  return jnp.mean(jnp.abs(err)) if loss == 'l1' else jnp.mean(err ** 2)


def finetune_stage(name, model: mae.MAE, spec: TaskSpec, out_dim: int, data: TaskData | None,
                   pretrained, config) -> loop.Stage:
  """Backbone + head with the task loss, layer-wise lr decay as in fbp_kd fine-tuning.

  ``data`` None: no batches (a stage built only to load its checkpoint).
  """
  cfg, size = config.finetune, config.backbone.image_size
  kind = spec.kind

  def init_params_fn(rng):
    # ``pretrained`` is a complete MAE tree (load_backbone): no second backbone init.
    params = mae.init_params(model, rng, size) if pretrained is None else pretrained
    head = head_module(out_dim).init(rng, jnp.zeros((1, model.width)))['params']
    return {'backbone': params, 'head': head}

  def layer(path):  # the head trains at the top rate, like fbp_kd's score head
    if path.startswith('backbone/'):
      return mae.layer_id(path[len('backbone/'):], model.depth)
    return model.depth + 1

  template = jax.eval_shape(init_params_fn, jax.random.key(0))
  tx, sched = optim.adamw(cfg, cfg.steps, template, layer, model.depth + 1)
  init_fn = lambda rng: state_lib.init_state(init_params_fn(rng), tx)

  def loss_fn(params, batch, rng):
    out = finetune_forward(model, out_dim, params, batch['image'], train=True, rng=rng)
    return task_loss(kind, spec.loss, out, batch['target']), {}

  batches = None
  if data is not None:
    mean, sd = target_stats(data)
    target = data.y_train if kind != 'regression' else (data.y_train - mean) / sd
    batches = pipeline.train_batches(config, data.train.images, {'target': target},
                                     batch_size=cfg.batch_size, pp=config.data.train_pp,
                                     seed=config.seed + 1)
  # 'target': one 0/1 per attribute (multilabel), else a class index or a value per face
  shapes = loop.batch_spec(cfg.batch_size, size, target=(out_dim,) if kind == 'multilabel' else ())
  return loop.Stage(name=name, num_steps=cfg.steps, batch_size=cfg.batch_size, init_fn=init_fn,
                    update_fn=state_lib.make_update(loss_fn, tx), schedule=sched,
                    batches=batches, batch_spec=shapes, loss_fn=loss_fn)


# ----------------------------------------------------------------------------- orchestration

class Job(stages_lib.StageStates):
  """One backbone; per task its data, features and (lazily) its fine-tuning stage.

  ``train=False`` never trains: fine-tuning stages are only restored (``--mode=eval``).
  """

  def __init__(self, config, workdir: str, train: bool = True, backbone: bool = True):
    """``backbone=False``: no backbone params (``self.params`` None, ``self.backbone`` {}):
    restoring the fine-tuned stages, which hold the whole backbone, does not need them."""
    check_config(config)
    self.tasks = parse_names(config.tasks, list(TASKS), 'tasks')
    self.protocols = parse_names(config.protocols, PROTOCOLS, 'protocols')
    self.known_stages = tuple(stage_name(t) for t in TASKS)
    self.config = config.copy_and_resolve_references()
    with self.config.unlocked():  # StageStates runs the listed stages, restores the others
      self.config.stages = ','.join(stage_name(t) for t in self.tasks) if train else ''
    self.workdir = workdir
    self.mesh = mesh_lib.make_mesh(config.get('mesh'))
    self.model, self.params, self.backbone = (load_backbone(self.config, self.mesh) if backbone
                                              else (make_backbone(self.config), None, {}))
    self.features = feature_fn(self.model, self.mesh)
    self._data = {}

  def data(self, task: str) -> TaskData:
    if task not in self._data:
      self._data[task] = load_task(self.config, task)
    return self._data[task]

  def stage(self, name, restore_only: bool = False) -> loop.Stage:
    task = name[len('finetune_'):]
    if name not in self.known_stages:
      raise KeyError(name)
    if restore_only:  # the head's width from the recorded facts: restoring reads no data
      return finetune_stage(name, self.model, TASKS[task], self.head_facts(task)['out_dim'],
                            None, None, self.config)
    data = self.data(task)
    stages_lib.record_facts(self.workdir, **{name: head_facts(data)})
    return finetune_stage(name, self.model, data.spec, data.out_dim, data, self.params,
                          self.config)

  def head_facts(self, task: str) -> dict:
    """``head_facts`` of a fine-tuned stage, as recorded where it was trained, else from the data."""
    name = stage_name(task)
    where = os.path.dirname(stages_lib.stage_dir(self.workdir, self.config.reuse_from, name))
    return stages_lib.model_facts(where).get(name) or head_facts(self.data(task))

  def finished(self, name: str) -> bool:
    d = os.path.dirname(stages_lib.stage_dir(self.workdir, self.config.reuse_from, name))
    return loop.is_done(d, name)

  def run_task(self, task: str, seconds: dict) -> dict:
    """Every requested protocol on one task; the fine-tuning stage runs or is restored."""
    data, c = self.data(task), self.config
    sizes = {'n_train': len(data.train), 'n_val': len(data.val)}
    out, preds = {'train_prior': {**train_prior(data), **sizes}}, {}
    if {'linear', 'fewshot'} & set(self.protocols):
      t = time.perf_counter()
      x_train, x_val = probes.standardize(
          predict(self.features, self.params, data.train, c, self.mesh),
          predict(self.features, self.params, data.val, c, self.mesh))
      seconds[f'{task}/features'] = time.perf_counter() - t
      if 'linear' in self.protocols:
        t = time.perf_counter()
        scores, reg, preds['linear'] = linear_probe(data, x_train, x_val, c.linear)
        out['linear'] = {**scores, **reg, **sizes}
        seconds[f'{task}/linear'] = time.perf_counter() - t
      if 'fewshot' in self.protocols:
        t = time.perf_counter()
        scores, preds['fewshot'] = fewshot_probe(data, x_train, x_val, c)
        out['fewshot'] = {**scores, 'n_val': len(data.val)}
        seconds[f'{task}/fewshot'] = time.perf_counter() - t
    name = stage_name(task)
    if 'finetune' in self.protocols and (c.stages or self.finished(name)):
      scores, preds['finetune'] = self.score_finetuned(data)
      out['finetune'] = {**scores, **sizes}
      seconds[f'{task}/finetune'] = stages_lib.seconds(self.workdir, c.reuse_from, [name]).get(
          name, float('nan'))
    elif 'finetune' in self.protocols:
      logging.warning('%s: stage %s is not finished; its fine-tuning is not scored', task, name)
    self.write_reports(data, preds)
    return out

  def write_reports(self, data: TaskData, preds: dict) -> None:
    """One picture of the val predictions per protocol -> reports/ (process 0 writes)."""
    for protocol, pred in preds.items():
      title = f'{data.name}, {protocol}' + (' (first draw)' if protocol == 'fewshot' else '')
      suffix, image = report_image(data, pred, f'{title} ({REPORT_PREFIX})')
      reports.save(self.workdir, f'{REPORT_PREFIX}_{data.name}_{protocol}_{suffix}', image,
                   self.writer)

  def score_finetuned(self, data: TaskData) -> tuple[dict, np.ndarray]:
    """(val scores, val predictions) of the task's fine-tuned model."""
    params = self.state(stage_name(data.name))['params']
    forward = jax.jit(functools.partial(finetune_forward, self.model, data.out_dim),
                      out_shardings=mesh_lib.replicated(self.mesh))
    outputs = predict(forward, params, data.val, self.config, self.mesh)
    pred = decode(data.spec.kind, outputs, target_stats(data))
    return score(data.spec, pred, data.y_val), pred


def check_backbone(workdir: str, backbone: dict, seed: int, record: bool) -> None:
  """One workdir, one backbone: its fine-tuned stages must not be mixed with another's."""
  path = os.path.join(workdir, 'backbone.json')
  key = json.loads(json.dumps({**{k: backbone[k] for k in (
      'workdir', 'stage', 'step', 'layout', 'model', 'image_size')}, 'seed': seed}))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != key:
      raise ValueError(f'{workdir} holds the transfer results of another backbone ({old}); '
                       f'this run\'s is {key}: use a new --workdir')
  elif record:
    stages_lib.write_json(path, key)


def run(config, workdir: str, train: bool, filename: str) -> dict:
  """All tasks x protocols; the results file is rewritten after every task."""
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  job = Job(config, workdir, train=train)
  check_backbone(workdir, job.backbone, config.seed, record=train)
  results, seconds = {}, {}
  for task in job.tasks:
    results[task] = job.run_task(task, seconds)
    results.update(backbone=job.backbone,
                   seconds={**seconds, 'total_this_run': time.perf_counter() - start})
    if not train:
      results['restored'] = job.restored
    stages_lib.write_results(os.path.join(workdir, filename), results)
  table = results_table(results, job.tasks, job.protocols)
  logging.info('transfer benchmark (%s):\n%s', describe_backbone(job.backbone), table)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, os.path.splitext(filename)[0] + '.md'), 'w') as f:
      f.write(f'Backbone: {describe_backbone(job.backbone)}\n\n{table}\n')
  log_results(results, job.writer, job.tasks)
  return results


def check_data(config, workdir: str) -> None:
  """Reads (and so checks) every task's train and val split before the first task runs."""
  del workdir
  for name in parse_names(config.tasks, list(TASKS), 'tasks'):
    load_task(config, name)


def train_and_evaluate(config, workdir: str) -> dict:
  return run(config, workdir, train=True, filename='results.json')


def evaluate(config, workdir: str) -> dict:
  """Re-runs the probes and scores the finished fine-tuning stages -> ``W/eval.json``."""
  return run(config, workdir, train=False, filename='eval.json')


def predict_photos(config, workdir: str, input_path: str, output: str,
                   align: str = 'auto') -> dict:
  """The fine-tuned heads of ``workdir`` (its finished ``finetune_<task>`` stages) on new photos.

  CSV columns per task: expression: the class and each class's probability;
  attributes: each attribute's probability; age, beauty: the predicted value. Each
  task's faces are aligned like its dataset's chips.
  """
  from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  b = config.backbone
  # The fine-tuned stages hold the whole backbone: the backbone's own checkpoint only
  # serves to check that the config names this workdir's backbone (backbone.json).
  has_backbone = not b.workdir or os.path.isdir(os.path.join(b.workdir, b.stage, 'ckpt'))
  job = Job(config, workdir, train=False, backbone=has_backbone)
  if has_backbone:
    check_backbone(workdir, job.backbone, config.seed, record=False)
  else:
    logging.info('backbone: %s is not here; predicting with the backbone held by the fine-tuned '
                 'stages (not checked against backbone.json)', os.path.join(b.workdir, b.stage))
  heads, classes = [], {}
  for task in job.tasks:
    if not job.finished(stage_name(task)):
      logging.warning('%s: stage %s is not finished in %s; not predicted', task,
                      stage_name(task), workdir)
      continue
    facts = job.head_facts(task)
    fn = jax.jit(functools.partial(finetune_forward, job.model, facts['out_dim']),
                 out_shardings=mesh_lib.replicated(job.mesh))
    if TASKS[task].kind == 'classification':
      classes[task] = tuple(facts['class_names'])
    heads.append(predict_lib.Head(functools.partial(
        _head_outputs, fn, job.state(stage_name(task))['params'], task, facts),
        config.backbone.image_size, facts['dataset'], config.data.eval_pp))
  if not heads:
    raise checkpoint.CheckpointError(f'no finished fine-tuning stage (finetune_<task> of tasks '
                                     f'{job.tasks}) in {workdir}: nothing to predict with')

  def columns(outputs):  # a classification task's class name first, then its probabilities
    table = {}
    for name, value in outputs.items():
      for task, names in classes.items():
        if name == f'{task}_p_{names[0]}':
          p = np.stack([outputs[f'{task}_p_{n}'] for n in names], axis=1)
          table[task] = np.asarray(names)[np.nan_to_num(p).argmax(-1)]
      table[name] = value
    return table
  return predict_lib.run(input_path, output, heads, job.mesh, config.eval_batch_size, align,
                         columns)


def _head_outputs(fn, params, task: str, facts: dict, images) -> dict:
  """One fine-tuned head's outputs as named [B] columns (probabilities or values)."""
  out, kind = np.asarray(fn(params, images), np.float64), TASKS[task].kind
  if kind == 'classification':
    p = np.exp(out - out.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return {f'{task}_p_{n}': p[:, i] for i, n in enumerate(facts['class_names'])}
  if kind == 'multilabel':
    p = 1 / (1 + np.exp(-out))
    return {f'{task}_{c}': p[:, i] for i, c in enumerate(facts['columns'])}
  return {task: decode(kind, out, (facts['target_mean'], facts['target_sd']))}


# ----------------------------------------------------------------------------- reporting

# The evaluate-stage prefix of the other tasks; --mode=eval scores the same val splits, so
# it rewrites the same files.
REPORT_PREFIX = 'eval'


def report_image(data: TaskData, pred, title: str) -> tuple[str, np.ndarray]:
  """(file suffix, picture) of a task's val predictions.

  A confusion matrix (classification), predicted vs true (regression), or each
  attribute's accuracy as a bar (multilabel).
  """
  if data.spec.kind == 'classification':
    return 'confusion', reports.confusion_matrix_image(pred, data.y_val, data.class_names, title)
  if data.spec.kind == 'regression':
    return 'scatter', reports.scatter(pred, data.y_val, title)
  accuracy = (np.asarray(pred) == data.y_val).mean(0)
  return 'accuracy', reports.bar_chart(accuracy, data.columns, f'{title}: accuracy')

def describe_backbone(b: dict) -> str:
  m = b['model']
  model = f'{m["variant"]} ViT, {m["stem"]} stem, patch {m["patch"]}, {b["image_size"]} px'
  if b['layout'] == 'scratch':
    return f'{model}, random init (scratch)'
  return f'{model}, {b["workdir"]}/{b["stage"]} step {b["step"]} ({b["layout"]} params)'


def _cell(entry: dict | None, metric: str) -> str:
  if not entry:
    return '-'
  if f'{metric}_std' in entry:
    return f'{entry[metric]:.3f} ± {entry[metric + "_std"]:.3f}'
  return f'{entry[metric]:.3f}'


def results_table(results: dict, tasks, protocols) -> str:
  """Markdown table: one row per task, the primary metric of each protocol."""
  cols = ['train_prior', *protocols]
  lines = ['| task | metric | ' + ' | '.join(cols) + ' | n train / val |',
           '|---' * (len(cols) + 3) + '|']
  for task in tasks:
    spec, r = TASKS[task], results[task]
    arrow = 'higher is better' if spec.higher_is_better else 'lower is better'
    cells = [_cell(r.get(p), spec.metric) for p in cols]
    n = r['train_prior']
    lines.append(f'| {task} | {spec.metric} ({arrow}) | ' + ' | '.join(cells)
                 + f' | {n["n_train"]} / {n["n_val"]} |')
  return '\n'.join(lines)


def log_results(results: dict, writer, tasks) -> None:
  """The headline metric of every task and protocol in TensorBoard (the log has the table)."""
  scalars = {f'transfer/{t}/{p}_{TASKS[t].metric}': r[TASKS[t].metric]
             for t in tasks for p, r in results[t].items() if TASKS[t].metric in r}
  writer.write_scalars(0, scalars)
  writer.flush()
