"""Evaluation metrics computed exactly on the host from gathered predictions."""
import numpy as np


def pearson(pred, target) -> float:
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  pc, tc = pred - pred.mean(), target - target.mean()
  denom = np.sqrt((pc ** 2).sum() * (tc ** 2).sum())
  return float((pc * tc).sum() / denom) if denom > 0 else 0.0


def mean_absolute_error(pred, target) -> float:
  return float(np.mean(np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))))


def root_mean_squared_error(pred, target) -> float:
  return float(np.sqrt(np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2)))


def regression_report(pred, target) -> dict:
  """PC / MAE / RMSE, the standard facial-beauty-prediction figures."""
  return {'pc': pearson(pred, target), 'mae': mean_absolute_error(pred, target),
          'rmse': root_mean_squared_error(pred, target), 'n': int(len(pred))}


# Face verification: a pair is accepted as the same person when similarity > threshold.


def _verification_inputs(similarity, same):
  similarity, same = np.asarray(similarity, np.float64), np.asarray(same)
  if similarity.ndim != 1 or similarity.shape != same.shape or not len(same):
    raise ValueError(f'need equal-length 1-D similarity and same, got shapes '
                     f'{similarity.shape} and {same.shape}')
  if not np.isfinite(similarity).all():
    raise ValueError('similarity has NaN or infinite values')
  return similarity, same.astype(bool)


def _distinct_ends(sorted_values):
  """Index of the last element of each run of equal values in a sorted array."""
  return np.flatnonzero(np.append(sorted_values[1:] != sorted_values[:-1], True))


def verification_folds(num_pairs, num_folds=10, seed=0, same=None) -> np.ndarray:
  """Fold index of each pair: a `seed`-shuffled split into folds whose sizes differ by <= 1.

  Given `same`, folds are stratified: each gets an equal share (within 1) of
  the same and of the different pairs, so every fold holds both classes.
  """
  if not 2 <= num_folds <= num_pairs:
    raise ValueError(f'cannot split {num_pairs} pairs into {num_folds} folds')
  rng = np.random.default_rng(seed)
  if same is None:
    order = rng.permutation(num_pairs)
  else:
    same = np.asarray(same).astype(bool)
    if same.shape != (num_pairs,):
      raise ValueError(f'same has shape {same.shape}, expected ({num_pairs},)')
    if min(same.sum(), (~same).sum()) < num_folds:
      raise ValueError(f'{same.sum()} same and {(~same).sum()} different pairs cannot '
                       f'give each of {num_folds} folds both classes')
    # Dealing one class after the other round-robin balances classes and fold sizes.
    order = np.concatenate([rng.permutation(np.flatnonzero(same)),
                            rng.permutation(np.flatnonzero(~same))])
  folds = np.empty(num_pairs, np.int64)
  folds[order] = np.arange(num_pairs) % num_folds
  return folds


def best_threshold(similarity, same) -> float:
  """The threshold of highest accuracy, exact over every distinct split, in O(n log n).

  Candidates are the midpoints between consecutive distinct similarities, the
  largest float below the minimum (all accepted) and the maximum (all
  rejected); ties go to the smallest threshold.
  """
  similarity, same = _verification_inputs(similarity, same)
  order = np.argsort(similarity, kind='stable')
  values, same = similarity[order], same[order]
  ends = _distinct_ends(values)
  values = values[ends]
  # Just above distinct value k, pairs up to it are rejected, the rest accepted.
  correct = np.cumsum(~same)[ends] + (same.sum() - np.cumsum(same)[ends])
  correct = np.concatenate([[same.sum()], correct])
  lo, hi = values[:-1], values[1:]
  mids = lo + (hi - lo) / 2
  mids = np.where(mids < hi, mids, lo)  # Adjacent floats: the midpoint may round up to hi.
  thresholds = np.concatenate([[np.nextafter(values[0], -np.inf)], mids, values[-1:]])
  return float(thresholds[np.argmax(correct)])


def verification_accuracy(similarity, same, num_folds=10, seed=0) -> dict:
  """LFW protocol: each fold's accuracy at the best threshold of the other folds.

  Returns the mean and standard deviation of the fold accuracies and the mean
  threshold; folds come from `verification_folds`, stratified by `same`.
  """
  similarity, same = _verification_inputs(similarity, same)
  folds = verification_folds(len(same), num_folds, seed, same=same)
  accuracies, thresholds = [], []
  for fold in range(num_folds):
    held_out = folds == fold
    threshold = best_threshold(similarity[~held_out], same[~held_out])
    accuracies.append(np.mean((similarity[held_out] > threshold) == same[held_out]))
    thresholds.append(threshold)
  return {'accuracy': float(np.mean(accuracies)), 'accuracy_std': float(np.std(accuracies)),
          'threshold': float(np.mean(thresholds))}


def tar_at_far(similarity, same, far=1e-3) -> tuple[float, float]:
  """(true-accept rate, threshold) at the smallest threshold with false-accept rate <= far.

  The measured FAR moves in steps of 1 / (number of different pairs); with
  fewer than 1/far different pairs only FAR = 0 satisfies the bound, a
  stricter operating point than asked, so this returns (nan, nan) then.
  """
  similarity, same = _verification_inputs(similarity, same)
  if not 0 < far < 1:
    raise ValueError(f'far must be in (0, 1), got {far}')
  if same.all() or not same.any():
    raise ValueError('need both same and different pairs')
  different = np.sort(similarity[~same])[::-1]
  n = len(different)
  # Most false accepts allowed, the largest k with k / n <= far in float arithmetic.
  allowed = int(far * n)
  allowed += (allowed + 1) / n <= far
  allowed -= allowed / n > far
  if not allowed:
    return float('nan'), float('nan')
  # Any lower threshold also accepts different[allowed]: one false accept too many.
  threshold = different[allowed]
  return float(np.mean(similarity[same] > threshold)), float(threshold)


def roc_curve(similarity, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(far, tar, thresholds): the thresholds are the distinct similarities, descending, then -inf.

  far and tar are non-decreasing and run from (0, 0) to (1, 1).
  """
  similarity, same = _verification_inputs(similarity, same)
  if same.all() or not same.any():
    raise ValueError('need both same and different pairs')
  order = np.argsort(-similarity, kind='stable')
  values, same = similarity[order], same[order]
  ends = _distinct_ends(values)
  accepted_same = np.concatenate([[0], np.cumsum(same)[ends]])
  accepted_different = np.concatenate([[0], np.cumsum(~same)[ends]])
  thresholds = np.append(values[ends], -np.inf)
  return (accepted_different / accepted_different[-1], accepted_same / accepted_same[-1],
          thresholds)


# Age and classification. Labels < 0 mean "unknown" (see faceflax/data/age_datasets.py)
# and are left out of the classification figures.


def age_report(pred, true) -> dict:
  """MAE in years and CS(5), the share of predictions within 5 years."""
  err = np.abs(np.asarray(pred, np.float64) - np.asarray(true, np.float64))
  return {'mae': float(err.mean()), 'cs5': float(np.mean(err <= 5)), 'n': int(err.size)}


def _known(pred, labels):
  pred, labels = np.asarray(pred), np.asarray(labels)
  if pred.shape != labels.shape:
    raise ValueError(f'predictions {pred.shape} and labels {labels.shape} differ in shape')
  known = labels >= 0
  if not known.any():
    raise ValueError('no known labels (all are < 0)')
  return pred[known].astype(np.int64), labels[known].astype(np.int64)


def accuracy(pred_labels, labels) -> float:
  """Share of exact matches among the examples with a known label (>= 0)."""
  pred_labels, labels = _known(pred_labels, labels)
  return float(np.mean(pred_labels == labels))


def group_accuracy(pred_group, true_group) -> dict:
  """Exact and one-off accuracy for ordered age groups (Adience: 8 groups).

  One-off also accepts the neighbouring group, as in the Adience literature.
  """
  pred_group, true_group = _known(pred_group, true_group)
  off = np.abs(pred_group - true_group)
  return {'exact': float(np.mean(off == 0)), 'one_off': float(np.mean(off <= 1)),
          'n': int(off.size)}
