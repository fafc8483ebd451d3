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
