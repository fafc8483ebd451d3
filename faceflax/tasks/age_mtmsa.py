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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from faceflax import losses, metrics, reports
from faceflax.data import age_datasets, pipeline
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, drop_bad_rows
from faceflax.models import resnet_msa
from faceflax.train import evaluation, job as job_lib, loop, optim
from faceflax.train import stages as stages_lib, state as state_lib

AGE_LOSSES = ('kl', 'dirac_gaussian', 'l1', 'ce')
FORMATS = age_datasets.FORMATS
CLASS_HEADS = {'gender': resnet_msa.NUM_GENDERS, 'race': resnet_msa.NUM_RACES}
LABELS = ('age', 'gender', 'race', 'age_group')
TRAIN_LABELS = ('age', 'gender', 'race')  # the labels of a training batch
# Class names of the codes (UTKFace's convention, which the readers map every format to).
CLASS_NAMES = {'gender': ('male', 'female'),
               'race': ('white', 'black', 'asian', 'indian', 'others')}


# ----------------------------------------------------------------------------- config

def check_config(config) -> None:
  """Rejects unknown names up front, before any data is read or step compiled."""
  for key, value, allowed in (('loss.age', config.loss.age, AGE_LOSSES),
                              ('data.format', config.data.format, FORMATS)):
    if value not in allowed:
      raise ValueError(f'{key}={value!r}: allowed values are {", ".join(allowed)}')
  resnet_msa.parse_heads(config.model.heads)
  if config.loss.sigma <= 0:
    raise ValueError(f'loss.sigma={config.loss.sigma}: must be > 0 (years)')
  stages_lib.parse(config.stages, Job.known_stages())


# ----------------------------------------------------------------------------- models

def predicted_age(out: dict, kind: str) -> jax.Array:
  """The expectation of the predicted age distribution (for 'l1': the regressed value)."""
  if kind == 'l1':
    return out['age_mean']
  if kind == 'dirac_gaussian':
    return losses.expected_age_gaussian(out['age_mean'], out['age_log_sigma'],
                                        out['age_logits'].shape[-1])
  return losses.expected_age(out['age_logits'])


# ----------------------------------------------------------------------------- data

def load_examples(config, split: str) -> Examples:
  """``split`` of ``data.dir`` in ``data.format``, with the labels age, gender, race, age_group."""
  d = config.data
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
  examples, skipped = age_datasets.read(d.dir, d.format, split, d.protocol)
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

def train_stage(model, config) -> loop.Stage:
  """The multi-task step (without batches: ``Job.batches``)."""
  cfg, size = config.train, config.data.image_size
  tx, sched = optim.adamw(cfg, cfg.steps)

  def init_fn(rng):
    v = resnet_msa.init_variables(model, rng, size)
    return state_lib.init_state(v['params'], tx, v['batch_stats'])

  def loss_fn(params, batch, rng, model_state):
    out, new = model.apply({'params': params, 'batch_stats': model_state}, batch['image'],
                           train=True, rngs={'dropout': rng}, mutable=['batch_stats'])
    loss, terms = multitask_loss(out, batch, config, model.num_ages)
    return loss, (terms, new['batch_stats'])

  return loop.train_stage('train', cfg, (tx, sched), init_fn, loss_fn, size,
                          dict.fromkeys(TRAIN_LABELS, ()))


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

  def forward(v, x):
    out = model.apply(v, x)
    pred = {'age': predicted_age(out, kind)}
    for head in CLASS_HEADS:
      if f'{head}_logits' in out:
        pred[head] = jnp.argmax(out[f'{head}_logits'], axis=-1)
    return pred

  return evaluation.predict_images(job_lib.replicated_jit(forward, mesh), variables,
                                   examples.images, config, mesh)


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
  flops = loop.flops_per_image(
      lambda v, im: predicted_age(model.apply(v, im), config.loss.age), variables, size)
  return {'params': loop.count_params(variables['params']), 'gflops_per_image': flops / 1e9,
          'variant': config.model.variant, 'image_size': size,
          'msa_stages': list(config.model.msa_stages), 'msa_rates': list(config.model.msa_rates),
          'heads': list(resnet_msa.parse_heads(config.model.heads)), 'age_loss': config.loss.age}


# ----------------------------------------------------------------------------- the job

class Job(job_lib.Job):
  """One 'train' stage; the model comes from the run or from its checkpoint."""

  STAGES = ('train',)
  check_config = staticmethod(check_config)

  def __init__(self, config, workdir, restore_only: bool = False):
    super().__init__(config, workdir, restore_only)
    self.model = resnet_msa.from_config(config.model, config.data.image_size, self.dtype)

  @staticmethod
  def data_reads(config, workdir):
    del workdir
    return {'train': lambda: load_examples(config, config.data.train_split),
            'evaluate': lambda: load_examples(config, config.data.eval_split)}

  def build(self, name, upstream):
    del name, upstream  # one stage, nothing upstream
    return train_stage(self.model, self.config)

  def batches(self, name):
    c = self.config
    examples = load_examples(c, c.data.train_split)
    return pipeline.train_batches(c, examples.images, {k: examples.labels[k] for k in TRAIN_LABELS},
                                  batch_size=c.train.batch_size, pp=c.data.train_pp, seed=c.seed)

  def variables(self) -> dict:
    s = self.state('train')
    return {'params': s['params'], 'batch_stats': s['model_state']}

  def evaluate(self, split, prefix):
    c = self.config
    examples = load_examples(c, split)
    variables = self.variables()
    pred = predict(self.model, variables, examples, c, self.mesh)
    results = score(pred, examples)
    self.write_reports(pred, examples, variables, prefix)  # all processes: the model runs
    results['model'] = model_report(self.model, variables, c)
    results['data'] = {'dir': c.data.dir, 'format': c.data.format, 'split': split,
                       'n': len(examples)}
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
    reports.save_attention(  # one overlay column per MSA stage
        self.workdir, f'{prefix}_msa_attention',
        lambda faces: self.model.apply(variables, jnp.asarray(faces))['attention'],
        examples.images, self.config, w)

  def predict_heads(self):
    """Age, and gender / race with each class's probability."""
    model, kind = self.model, self.config.loss.age

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

    from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top  # TensorFlow
    c = self.config
    head = predict_lib.Head(functools.partial(job_lib.replicated_jit(forward, self.mesh),
                                              self.variables()),
                            c.data.image_size, c.data.dir, c.data.eval_pp)
    return [head], columns

  @staticmethod
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
    job_lib.log_scalars(writer, scalars)
