"""Age estimation: ResNet with dilated multi-scale attention, multi-task age / gender / race.

Stages (``config.stages``), each checkpointed under ``<workdir>/<stage>``:
  train     one jit step: the age loss (``loss.age``: label-distribution KL (+ L1 on the
            expected age), Dirac-vs-Gaussian KL, L1 regression or age classification)
            plus the weighted gender and race cross-entropies; unknown labels (< 0) are
            masked out of their head's loss. BatchNorm statistics ride in the state.
  evaluate  age MAE and CS(5), gender and race accuracy, exact / one-off age-group
            accuracy when the data has groups (Adience), params and GFLOPs per image
            on ``data.eval_split`` -> ``<workdir>/results.json``

The predicted age is the expectation of the predicted distribution ('kl', 'ce'), the
discretised predicted Gaussian ('dirac_gaussian') or the regressed value ('l1').
"""
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from faceflax import losses, metrics, reports
from faceflax.data import age_datasets, pipeline
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, drop_bad_rows, read_folder
from faceflax.models import resnet_msa
from faceflax.train import evaluation, loop, mesh as mesh_lib, optim, precision
from faceflax.train import stages as stages_lib, state as state_lib

STAGES = ('train', 'evaluate')
AGE_LOSSES = ('kl', 'dirac_gaussian', 'l1', 'ce')
FORMATS = ('folder', 'utkface', 'morph', 'adience')
CLASS_HEADS = {'gender': resnet_msa.NUM_GENDERS, 'race': resnet_msa.NUM_RACES}
LABELS = ('age', 'gender', 'race', 'age_group')
TRAIN_LABELS = ('age', 'gender', 'race')  # the labels of a training batch
# Class names of the codes (UTKFace's convention, which the readers map every format to).
CLASS_NAMES = {'gender': ('male', 'female'),
               'race': ('white', 'black', 'asian', 'indian', 'others')}


# ----------------------------------------------------------------------------- config

def heads(config) -> tuple[str, ...]:
  """``model.heads`` as names; also accepts one 'age,gender' string (a shell override)."""
  value = config.model.heads
  value = (value,) if isinstance(value, str) else tuple(value)
  names = tuple(n.strip() for v in value for n in str(v).split(',') if n.strip())
  unknown = [n for n in names if n not in resnet_msa.HEADS]
  if unknown:
    raise ValueError(f'model.heads: unknown head(s) {unknown}; allowed: '
                     f'{", ".join(resnet_msa.HEADS)}')
  if 'age' not in names:
    raise ValueError(f'model.heads={names}: the age head is required (allowed: '
                     f'{", ".join(resnet_msa.HEADS)})')
  return tuple(dict.fromkeys(names))


def check_config(config) -> None:
  """Rejects unknown names up front, before any data is read or step compiled."""
  for key, value, allowed in (('loss.age', config.loss.age, AGE_LOSSES),
                              ('data.format', config.data.format, FORMATS)):
    if value not in allowed:
      raise ValueError(f'{key}={value!r}: allowed values are {", ".join(allowed)}')
  heads(config)
  if config.loss.sigma <= 0:
    raise ValueError(f'loss.sigma={config.loss.sigma}: must be > 0 (years)')
  stages_lib.parse(config.stages, STAGES)


# ----------------------------------------------------------------------------- models

def make_model(config) -> resnet_msa.ResNetMSA:
  m = config.model
  return resnet_msa.make(m.variant, msa_stages=tuple(m.msa_stages),
                         msa_rates=tuple(m.msa_rates), heads=heads(config), max_age=m.max_age,
                         dropout=m.dropout, image_size=config.data.image_size,
                         dtype=precision.compute_dtype(config.train))


def init_variables(model, rng, size: int) -> dict:
  """Parameters and BatchNorm statistics, initialised on a 64 px face at most: the heads
  read mean-pooled features, so no variable depends on the image size, and start-up traces
  and compiles a small forward pass instead of the training one."""
  size = min(size, 64)
  return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, size, size, 3)))


def predicted_age(out: dict, kind: str) -> jax.Array:
  """The expectation of the predicted age distribution (for 'l1': the regressed value)."""
  if kind == 'l1':
    return out['age_mean']
  if kind == 'dirac_gaussian':
    return losses.expected_age_gaussian(out['age_mean'], out['age_log_sigma'],
                                        out['age_logits'].shape[-1])
  return losses.expected_age(out['age_logits'])


# ----------------------------------------------------------------------------- data

def _class_problem(value, column: str, num: int) -> str | None:
  """None for a class code in -1..num-1 or an empty value (unknown), else what is wrong."""
  number = value
  if isinstance(value, str):
    if not value.strip():
      return None
    try:
      number = float(value)
    except ValueError:
      number = None
  if number is not None and np.isnan(number):
    return None
  if number is not None and np.isfinite(number) and number == round(number) and -1 <= number < num:
    return None
  shown = repr(value) if isinstance(value, str) else f'{value:g}'
  return (f'column {column!r} must hold integer codes 0..{num - 1} (empty or -1 = unknown), '
          f'got {shown}')


def _class_codes(examples: Examples, column: str) -> np.ndarray:
  """A checked class column as int32, empty or -1 = unknown (-1); absent = all unknown."""
  if column not in examples.labels:
    return np.full(len(examples), age_datasets.UNKNOWN, np.int32)
  values = [float(v) if not isinstance(v, str) or v.strip() else np.nan
            for v in examples.labels[column]]
  return np.nan_to_num(np.asarray(values, np.float64), nan=age_datasets.UNKNOWN).astype(np.int32)


def _read_folder(data_dir, split) -> Examples:
  examples = read_folder(data_dir, split, label_columns=('age',))
  where = os.path.join(data_dir, 'labels.csv')
  classes = {**CLASS_HEADS, 'age_group': len(age_datasets.ADIENCE_GROUPS)}
  for column, num in classes.items():
    if column in examples.labels:
      examples = drop_bad_rows(
          examples, [_class_problem(v, column, num) for v in examples.labels[column]], where,
          f'bad {column} code(s)')
  labels = {'age': examples.labels['age'].astype(np.float32),
            **{c: _class_codes(examples, c) for c in classes}}
  return Examples(examples.name, examples.paths, labels, examples.rows, examples.store)


def load_examples(config, split: str) -> Examples:
  """``split`` of ``data.dir`` in ``data.format``, with the labels age, gender, race, age_group."""
  d = config.data
  if d.format not in FORMATS:
    raise ValueError(f'data.format={d.format!r}: allowed values are {", ".join(FORMATS)}')
  if not d.dir:
    raise ValueError('data.dir is empty: age_mtmsa has no built-in data; pass '
                     '--config.data.dir=DIR (see configs/age_mtmsa.py for the formats)')
  if not os.path.isdir(d.dir):
    raise DataError(f'data.dir={d.dir!r} ({os.path.abspath(d.dir)}) is not a directory; '
                    'relative paths start from the working directory (run from the project '
                    'root) and age_mtmsa has no built-in data: pass --config.data.dir=DIR')
  if d.protocol and d.format in ('folder', 'utkface'):
    logging.warning('data.protocol=%r ignored: the %s format has fixed splits', d.protocol,
                    d.format)
  skipped = ()
  if d.format == 'folder':
    examples = _read_folder(d.dir, split)
  elif d.format == 'utkface':
    examples, skipped = age_datasets.read_utkface(d.dir, split, skip_malformed=True)
  elif d.format == 'morph':
    examples = age_datasets.read_morph(d.dir, split, d.protocol or 'random_80_20')
  else:
    examples, skipped = age_datasets.read_adience(d.dir, split, d.protocol or 'fold0')
  if skipped:
    logging.warning('%s: skipped %d unusable entries, e.g. %s', d.dir, len(skipped),
                    '; '.join(skipped[:3]))
  max_age = config.model.max_age
  examples = drop_bad_rows(
      examples, [None if 0 <= a <= max_age else f'age {a:g}' for a in examples.labels['age']],
      f'{d.dir} split {split!r}', f'age(s) outside 0..{max_age} (model.max_age)')
  ages = examples.labels['age']
  logging.info('%s split %r: %d faces, ages %g..%g', d.dir, split, len(examples), ages.min(),
               ages.max())
  return examples


def train_batches(config, examples: Examples, batch_size: int, seed: int):
  labels = {k: examples.labels[k] for k in TRAIN_LABELS}
  return pipeline.train_batches(config, examples.images, labels, batch_size=batch_size,
                                pp=config.data.train_pp, seed=seed)


# ----------------------------------------------------------------------------- losses

def age_terms(out: dict, ages, loss_config, num_ages: int) -> tuple[jax.Array, dict]:
  """The configured age loss and the batch's training MAE."""
  kind = loss_config.age
  pred = predicted_age(out, kind)
  if kind == 'kl':
    loss = losses.age_kl(out['age_logits'], ages, loss_config.sigma)
    if loss_config.l1_weight:
      loss += loss_config.l1_weight * losses.age_l1(pred, ages)
  elif kind == 'dirac_gaussian':
    loss = losses.dirac_gaussian_kl(out['age_mean'], out['age_log_sigma'], ages, num_ages)
  elif kind == 'l1':
    loss = losses.age_l1(pred, ages)
  elif kind == 'ce':
    loss = losses.age_cross_entropy(out['age_logits'], ages)
  else:
    raise ValueError(f'loss.age={kind!r}: allowed values are {", ".join(AGE_LOSSES)}')
  mae = jnp.mean(jnp.abs(jax.lax.stop_gradient(pred) - ages.astype(jnp.float32)))
  return loss, {'age_loss': loss, 'train_mae': mae}


def masked_cross_entropy(logits, labels) -> jax.Array:
  """Softmax cross-entropy over the examples whose label is known (>= 0); 0 if none is."""
  labels = labels.astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.maximum(labels, 0))
  return losses.masked_mean(ce, (labels >= 0).astype(jnp.float32))


def multitask_loss(out: dict, batch: dict, config, num_ages: int) -> tuple[jax.Array, dict]:
  total, terms = age_terms(out, batch['age'], config.loss, num_ages)
  for head in CLASS_HEADS:
    if f'{head}_logits' in out:
      terms[f'{head}_loss'] = masked_cross_entropy(out[f'{head}_logits'], batch[head])
      total += config.loss[f'{head}_weight'] * terms[f'{head}_loss']
  return total, terms


# ----------------------------------------------------------------------------- stages

def train_stage(name, model, config, examples: Examples | None) -> loop.Stage:
  """The multi-task step; ``examples=None`` builds it for restoring only (no batches)."""
  cfg, size = config.train, config.data.image_size
  tx, sched = optim.adamw(cfg, cfg.steps)

  def init_fn(rng):
    v = init_variables(model, rng, size)
    return state_lib.init_state(v['params'], tx, v['batch_stats'])

  def loss_fn(params, batch, rng, model_state):
    out, new = model.apply({'params': params, 'batch_stats': model_state}, batch['image'],
                           train=True, rngs={'dropout': rng}, mutable=['batch_stats'])
    loss, terms = multitask_loss(out, batch, config, model.num_ages)
    return loss, (terms, new['batch_stats'])

  batches = None if examples is None else train_batches(config, examples, cfg.batch_size,
                                                        config.seed)
  return loop.Stage(
      name=name, num_steps=cfg.steps, batch_size=cfg.batch_size, init_fn=init_fn,
      update_fn=state_lib.make_update(loss_fn, tx), schedule=sched, batches=batches,
      batch_spec=loop.batch_spec(cfg.batch_size, size, **{k: () for k in TRAIN_LABELS}),
      loss_fn=loss_fn)


# ----------------------------------------------------------------------------- evaluation

def age_to_group(ages) -> np.ndarray:
  """The Adience group nearest to each age (distance to the group's [low, high] range)."""
  groups = np.asarray(age_datasets.ADIENCE_GROUPS, np.float64)
  ages = np.asarray(ages, np.float64)[:, None]
  distance = np.maximum(groups[:, 0] - ages, 0) + np.maximum(ages - groups[:, 1], 0)
  return np.argmin(distance, axis=1)  # ties (gaps between groups) go to the younger group


def predict(model, variables, examples: Examples, config, mesh) -> dict[str, np.ndarray]:
  """Predicted age (and gender / race class) of every example exactly once, in order."""
  kind = config.loss.age

  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))
  def forward(v, x):
    out = model.apply(v, x)
    pred = {'age': predicted_age(out, kind)}
    for head in CLASS_HEADS:
      if f'{head}_logits' in out:
        pred[head] = jnp.argmax(out[f'{head}_logits'], axis=-1)
    return pred

  return evaluation.predict_all(forward, variables, examples.images, mesh,
                                batch_size=config.eval_batch_size, pp=config.data.eval_pp,
                                cache_pp=pipeline.cache_pp(config))


def score(pred: dict, examples: Examples) -> dict:
  """Age MAE / CS(5), head accuracies over known labels, age-group accuracy if any groups."""
  labels = examples.labels
  out = {'age': metrics.age_report(pred['age'], labels['age'])}
  for head in CLASS_HEADS:
    if head not in pred:
      continue
    known = labels[head] >= 0
    if not known.any():
      logging.info('no known %s labels in %s: %s accuracy not scored', head, examples.name, head)
      continue
    out[head] = {'accuracy': metrics.accuracy(pred[head], labels[head]), 'n': int(known.sum())}
  if (labels['age_group'] >= 0).any():
    out['age_group'] = metrics.group_accuracy(age_to_group(pred['age']), labels['age_group'])
  return out


def model_report(model, variables, config) -> dict:
  size = config.data.image_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  flops = loop.flops_per_example(
      lambda v, im: predicted_age(model.apply(v, im), config.loss.age), variables, x)
  return {'params': loop.count_params(variables['params']), 'gflops_per_image': flops / 1e9,
          'variant': config.model.variant, 'image_size': size,
          'msa_stages': list(config.model.msa_stages), 'msa_rates': list(config.model.msa_rates),
          'heads': list(heads(config)), 'age_loss': config.loss.age}


# ----------------------------------------------------------------------------- orchestration

class Job(stages_lib.StageStates):
  """Builds the train stage lazily; its model comes from the run or from a checkpoint."""

  known_stages = STAGES

  def __init__(self, config, workdir):
    check_config(config)
    self.config, self.workdir = config, workdir
    self.mesh = mesh_lib.make_mesh(config.get('mesh'))
    self.model = make_model(config)

  def stage(self, name, restore_only: bool = False) -> loop.Stage:
    if name != 'train':
      raise KeyError(name)
    c = self.config
    examples = None if restore_only else load_examples(c, c.data.train_split)
    return train_stage(name, self.model, c, examples)

  def variables(self) -> dict:
    s = self.state('train')
    return {'params': s['params'], 'batch_stats': s['model_state']}

  def evaluate_on(self, examples: Examples, split: str, prefix: str = 'eval') -> dict:
    variables = self.variables()
    pred = predict(self.model, variables, examples, self.config, self.mesh)
    results = score(pred, examples)
    self.write_reports(pred, examples, variables, prefix)  # all processes: the model runs
    results['model'] = model_report(self.model, variables, self.config)
    results['data'] = {'dir': self.config.data.dir, 'format': self.config.data.format,
                       'split': split, 'n': len(examples)}
    return results

  def write_reports(self, pred, examples: Examples, variables, prefix: str) -> None:
    """Age scatter, gender / race confusion matrices, MSA attention on 4 faces -> reports/."""
    labels, w = examples.labels, self.writer
    known = np.isfinite(labels['age']) & (labels['age'] >= 0)
    if known.any():
      reports.save(self.workdir, f'{prefix}_age_scatter', reports.scatter(
          pred['age'][known], labels['age'][known], f'predicted vs true age ({prefix})'), w)
    for head, names in CLASS_NAMES.items():
      if head in pred and (labels[head] >= 0).any():
        reports.save(self.workdir, f'{prefix}_{head}_confusion', reports.confusion_matrix_image(
            pred[head], labels[head], names, f'{head} ({prefix})'), w)
    faces = reports.probe_faces(examples.images, self.config.data.eval_pp,
                                pipeline.cache_pp(self.config))
    maps = self.model.apply(variables, jnp.asarray(faces))['attention']
    if maps:  # one overlay column per MSA stage
      reports.save(self.workdir, f'{prefix}_msa_attention', reports.attention_overlay(
          faces, [np.asarray(m, np.float32) for m in maps]), w)


def check_data(config, workdir: str) -> None:
  """Reads (and so checks) every split the listed stages use, before the first one trains."""
  del workdir
  stages_lib.read_listed(config, STAGES, {
      'train': lambda: load_examples(config, config.data.train_split),
      'evaluate': lambda: load_examples(config, config.data.eval_split)})


def train_and_evaluate(config, workdir: str) -> dict:
  start = time.perf_counter()
  check_config(config)
  names = stages_lib.parse(config.stages, STAGES)
  os.makedirs(workdir, exist_ok=True)
  # The eval split is read first: a typo in it fails now, not after training.
  eval_examples = (load_examples(config, config.data.eval_split) if 'evaluate' in names
                   else None)
  job = Job(config, workdir)
  if 'train' in names:
    job.state('train')
  if eval_examples is None:
    return {}
  results = job.evaluate_on(eval_examples, config.data.eval_split)
  results['stage_seconds'] = stages_lib.seconds(workdir, config.reuse_from, STAGES[:-1])
  results['wall_seconds_this_run'] = time.perf_counter() - start
  log_results(results, job.writer)
  stages_lib.write_results(os.path.join(workdir, 'results.json'), results)
  return results


def evaluate(config, workdir: str) -> dict:
  """Scores the trained model of ``workdir`` on ``data.dir`` / ``eval.split``."""
  check_config(config)
  job = Job(stages_lib.restore_only(config), workdir)  # load, never train
  examples = load_examples(config, config.eval.split)
  name = os.path.basename(os.path.normpath(config.data.dir))
  results = job.evaluate_on(examples, config.eval.split, f'eval_{name}')
  log_results(results, None)
  results['restored'] = job.restored
  stages_lib.write_results(os.path.join(workdir, f'eval_{name}.json'), results)
  return results


def predict_photos(config, workdir: str, input_path: str, output: str,
                   align: str = 'auto') -> dict:
  """Age (and gender / race with each class's probability) of new photos -> CSV."""
  from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  check_config(config)
  job = Job(stages_lib.restore_only(config), workdir)  # load, never train
  model, variables, kind = job.model, job.variables(), config.loss.age

  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(job.mesh))
  def forward(v, x):
    out = model.apply(v, x)
    return {'age': predicted_age(out, kind),
            **{f'{h}_p': jax.nn.softmax(out[f'{h}_logits']) for h in CLASS_HEADS
               if f'{h}_logits' in out}}

  def columns(outputs):
    table = {'age': outputs['age']}
    for head, names in CLASS_NAMES.items():
      if f'{head}_p' in outputs:
        p = outputs[f'{head}_p']
        table[head] = np.asarray(names)[np.nan_to_num(p).argmax(-1)]
        table.update({f'p_{n}': p[:, i] for i, n in enumerate(names)})
    return table

  head = predict_lib.Head(functools.partial(forward, variables), config.data.image_size, config.data.dir, config.data.eval_pp)
  return predict_lib.run(input_path, output, [head], job.mesh, config.eval_batch_size, align,
                         columns)


def log_results(results: dict, writer) -> None:
  a, m = results['age'], results['model']
  cells = [f'age MAE={a["mae"]:.3f} CS(5)={a["cs5"]:.4f}']
  scalars = {'eval/age_mae': a['mae'], 'eval/age_cs5': a['cs5']}
  for head in CLASS_HEADS:
    if head in results:
      cells.append(f'{head} acc={results[head]["accuracy"]:.4f}')
      scalars[f'eval/{head}_accuracy'] = results[head]['accuracy']
  if 'age_group' in results:
    g = results['age_group']
    cells.append(f'age group exact={g["exact"]:.4f} one-off={g["one_off"]:.4f}')
    scalars.update({'eval/age_group_exact': g['exact'], 'eval/age_group_one_off': g['one_off']})
  logging.info('%s (n=%d)  params=%d  GFLOPs/img=%.3f', '  '.join(cells), a['n'], m['params'],
               m['gflops_per_image'])
  if writer is not None:
    writer.write_scalars(0, scalars)
