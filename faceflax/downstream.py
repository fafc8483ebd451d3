"""Labelled face tasks: a task's spec, its data and targets, the loss of a head on it,
decoding the head's outputs, scores and a picture of the predictions.

The kinds: 'classification' (one integer class column), 'multilabel' (+1/-1 attribute
columns, CelebA's convention) and 'regression' (one value column, regressed standardised).
Used by the transfer benchmark (``tasks/transfer.py``) and by any method that trains a
head on a folder-format label.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from faceflax import metrics, probes, reports
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, drop_bad_rows, read_folder

KINDS = ('classification', 'multilabel', 'regression')


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One labelled task: where its data is, what it predicts and how it is scored."""
  data: str                    # folder-format dataset under config.data.root
  columns: tuple[str, ...]     # label columns; () = every +1/-1 column of labels.csv
  kind: str                    # one of KINDS
  metric: str                  # primary metric, a key of score()'s result
  higher_is_better: bool
  num_classes: int = 0         # classification only
  loss: str = 'mse'            # regression only: 'mse' | 'l1'
  class_names: tuple[str, ...] = ()  # classification: the name of each class (--mode=predict)


# Never attributes, even when a dataset happens to hold only +1/-1 in them.
NOT_ATTRIBUTES = ('filename', 'identity', 'id_noisy', 'split', 'n_faces_detected')


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


def attribute_columns(examples: Examples) -> tuple[str, ...]:
  """Label columns holding only +1 / -1 (CelebA's attribute convention), in csv order."""
  return tuple(k for k, v in examples.labels.items()
               if k not in NOT_ATTRIBUTES and v.dtype != object and len(v)
               and np.isin(v, (-1, 1)).all())


def known_classes(spec: TaskSpec, examples: Examples, where: str) -> Examples:
  """A classification task's examples whose class is one of 0..num_classes-1 (others: bad
  examples)."""
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


def load(name: str, spec: TaskSpec, root: str, train_split: str, val_split: str,
         max_train: int = 0, max_val: int = 0, seed: int = 0) -> TaskData:
  """Task ``name``'s train and val splits of the folder-format dataset (or record store)
  ``root``, with targets of its kind; ``max_*`` > 0: a fixed random subset (``seed``)."""
  where = os.path.join(root, 'labels.csv')
  train = known_classes(spec, read_folder(root, train_split, label_columns=spec.columns), where)
  columns = spec.columns or attribute_columns(train)
  if not columns:
    raise DataError(f'{where}: task {name!r} found no +1/-1 attribute columns')
  val = known_classes(spec, read_folder(root, val_split, label_columns=columns), where)
  train, val = _subset(train, max_train, seed), _subset(val, max_val, seed)
  data = TaskData(name, spec, root, columns, train, val, _targets(spec, train, columns),
                  _targets(spec, val, columns))
  logging.info('%s: %s, %d train / %d val faces, %d label column(s) (%s)', name, root,
               len(train), len(val), len(columns), spec.kind)
  return data


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


def task_loss(kind: str, loss: str, outputs, target) -> jax.Array:
  if kind == 'classification':
    return optax.softmax_cross_entropy_with_integer_labels(
        outputs, target.astype(jnp.int32)).mean()
  if kind == 'multilabel':
    return optax.sigmoid_binary_cross_entropy(outputs, target).mean()
  err = outputs[:, 0] - target
  return jnp.mean(jnp.abs(err)) if loss == 'l1' else jnp.mean(err ** 2)


def head_outputs(kind: str, task: str, facts: dict, outputs) -> dict:
  """A head's [B, out_dim] outputs as named [B] columns: each class's probability
  (classification), each attribute's (multilabel), or the value (regression); ``facts``:
  the head's class names, columns and target mean and sd (transfer's ``head_facts``)."""
  out = np.asarray(outputs, np.float64)
  if kind == 'classification':
    p = np.exp(out - out.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return {f'{task}_p_{n}': p[:, i] for i, n in enumerate(facts['class_names'])}
  if kind == 'multilabel':
    p = 1 / (1 + np.exp(-out))
    return {f'{task}_{c}': p[:, i] for i, c in enumerate(facts['columns'])}
  return {task: decode(kind, out, (facts['target_mean'], facts['target_sd']))}


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


# ----------------------------------------------------------------------------- linear probes

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


def linear_probe(data: TaskData, x_train, x_val, cfg,
                 rows=None) -> tuple[dict, dict, np.ndarray]:
  """Fits on the train features (``rows`` of them).

  Returns (val scores, the chosen regularisation, val predictions).
  """
  w, b, reg = fit_probe(data, x_train, cfg, rows)
  pred = decode(data.spec.kind, x_val @ w + b)
  return score(data.spec, pred, data.y_val), reg, pred


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
