"""Probes on frozen features: closed-form ridge and RBF kernel ridge with exact leave-one-out
selection, L-BFGS-fitted multinomial / per-output logistic regression, and seeded few-shot
row draws. Pure functions of arrays (NumPy in, NumPy out), used by the transfer benchmark
and by ``fbp_kd``'s external teacher (a kernel ridge on a face embedding)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Zero mean, unit variance per feature, with the train statistics for every set."""
  mu, sd = train.mean(0), train.std(0) + 1e-6
  return [((x - mu) / sd).astype(np.float32) for x in (train, *others)]


def ridge_fit(x, y, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """argmin_w,b mean((x w + b - y)^2) + lam |w|^2 in closed form; the bias is not penalised."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xm, ym = x.mean(0), y.mean(0)
  xc, yc = x - xm, y - ym
  w = np.linalg.solve(xc.T @ xc + len(x) * lam * np.eye(x.shape[1]), xc.T @ yc)
  return w, ym - xm @ w


def ridge_loo_errors(x, y, lams) -> np.ndarray:
  """Exact leave-one-out mean squared error of ``ridge_fit`` for each lambda (one SVD).

  The penalty n * lam stays fixed when a row is left out; the LOO residual of
  row i is r_i / (1 - h_ii), h the hat matrix including the unpenalised bias.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64).reshape(len(x), -1)
  n = len(x)
  xc, yc = x - x.mean(0), y - y.mean(0)
  u, sv, _ = np.linalg.svd(xc, full_matrices=False)
  uty = u.T @ yc
  errors = []
  for lam in lams:
    shrink = sv ** 2 / (sv ** 2 + n * lam)
    residual = yc - u @ (shrink[:, None] * uty)
    h = 1.0 / n + (u ** 2) @ shrink
    with np.errstate(divide='ignore', invalid='ignore'):
      err = np.mean((residual / (1 - h)[:, None]) ** 2)
    errors.append(err if np.isfinite(err) and h.max() < 1 - 1e-9 else np.inf)
  return np.asarray(errors)


def ridge_select(x, y, lams) -> tuple[np.ndarray, np.ndarray, float]:
  """``ridge_fit`` with the lambda of least leave-one-out error among ``lams``."""
  lams = tuple(lams) if np.ndim(lams) else (lams,)
  lam = float(lams[int(np.argmin(ridge_loo_errors(x, y, lams)))]) if len(lams) > 1 else lams[0]
  return (*ridge_fit(x, y, lam), float(lam))


def rbf_kernel(a, b, gamma: float) -> np.ndarray:
  """exp(-gamma |a_i - b_j|^2), float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
  return np.exp(-gamma * np.maximum(sq, 0.0))


@dataclasses.dataclass(frozen=True)
class KernelRidge:
  """y ~ mean + sum_i alpha_i k(x_i, x), chosen by exact leave-one-out error."""
  x: np.ndarray
  alpha: np.ndarray
  mean: float
  gamma: float
  lam: float
  loo_predictions: np.ndarray  # each training row predicted by the fit without it

  def __call__(self, x, chunk: int = 4096) -> np.ndarray:
    return np.concatenate([rbf_kernel(x[i:i + chunk], self.x, self.gamma) @ self.alpha
                           for i in range(0, len(x), chunk)] or [np.zeros(0)]) + self.mean


def kernel_ridge_select(x, y, gammas, lams) -> KernelRidge:
  """RBF kernel ridge, argmin_f sum (f(x_i) - y_i)^2 + lam |f|^2 on y less its mean, with
  the (gamma, lam) of least exact leave-one-out squared error.

  One eigendecomposition per gamma serves every lam: with K = Q diag(e) Q^T, the hat
  matrix is H = Q diag(e / (e + lam)) Q^T and row i's leave-one-out residual is
  r_i / (1 - H_ii). The mean stays that of all rows (its own 1/n leave-one-out effect is
  ignored). O(n^2) memory, O(n^3) time: meant for a few thousand labeled rows.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mean = float(y.mean())
  yc = y - mean
  best = None
  for gamma in gammas:
    e, q = np.linalg.eigh(rbf_kernel(x, x, gamma))
    e = np.maximum(e, 0.0)
    qty = q.T @ yc
    for lam in lams:
      shrink = e / (e + lam)
      loo = yc - (yc - q @ (shrink * qty)) / (1 - (q ** 2) @ shrink)
      err = float(np.mean((loo - yc) ** 2))
      if best is None or err < best[0]:
        best = (err, gamma, lam, q @ (qty / (e + lam)), loo + mean)
  _, gamma, lam, alpha, loo = best
  logging.info('kernel ridge: gamma %g, lambda %g of %s x %s (leave-one-out MSE %.4f)',
               gamma, lam, tuple(gammas), tuple(lams), best[0])
  return KernelRidge(x, alpha, mean, float(gamma), float(lam), loo)


def probe_loss(params, x, y, weights, kind: str, l2: float):
  """Weighted mean cross-entropy (softmax or per-output sigmoid) + l2 / 2 |W|^2.

  Multilabel: the per-output mean losses are summed, so every output is its own
  logistic regression with the same penalty. Rows of weight 0 do not count at all.
  """
  logits = x @ params['w'] + params['b']
  if kind == 'classification':
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  else:
    ce = optax.sigmoid_binary_cross_entropy(logits, y).sum(-1)
  return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(params['w'] ** 2)


@functools.partial(jax.jit, static_argnames=('kind', 'num_outputs', 'max_steps'))
def _logistic_fit(x, y, weights, l2, tol, *, kind, num_outputs, max_steps):
  fn = lambda p: probe_loss(p, x, y, weights, kind, l2)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fn)

  def body(carry):
    p, s = carry
    value, grad = value_and_grad(p, state=s)
    updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=fn)
    return optax.apply_updates(p, updates), s

  def cond(carry):
    _, s = carry
    step, grad = optax.tree.get(s, 'count'), optax.tree.get(s, 'grad')
    return (step == 0) | ((step < max_steps) & (optax.tree.norm(grad) >= tol))

  p = {'w': jnp.zeros((x.shape[1], num_outputs)), 'b': jnp.zeros(num_outputs)}
  p, s = jax.lax.while_loop(cond, body, (p, opt.init(p)))
  return p, optax.tree.get(s, 'count'), fn(p)


def logistic_fit(x, y, kind: str, num_outputs: int, l2: float, max_steps: int = 500,
                 tol: float = 1e-5, rows=None) -> tuple[np.ndarray, np.ndarray]:
  """Full-batch L-BFGS fit of a multinomial (classification) or per-output logistic probe.

  ``rows``: fit on these rows only. They are selected by zero weights, so every
  subset of ``x`` shares one compiled fit.
  """
  weights = np.ones(len(x), np.float32)
  if rows is not None:
    weights = np.zeros(len(x), np.float32)
    weights[rows] = 1.0
  y = jnp.asarray(y, jnp.int32 if kind == 'classification' else jnp.float32)
  p, steps, loss = _logistic_fit(jnp.asarray(x, jnp.float32), y, weights, l2, tol, kind=kind,
                                 num_outputs=num_outputs, max_steps=max_steps)
  logging.debug('logistic probe: %d L-BFGS steps, loss %.4f', int(steps), float(loss))
  return np.asarray(p['w']), np.asarray(p['b'])


def fewshot_indices(labels, seed: int, kind: str, per_class: int = 10,
                    fraction: float = 0.02) -> np.ndarray:
  """Sorted rows of ``labels`` (the train split) for one few-shot draw.

  Classification: ``per_class`` rows of each class (all of a smaller class);
  otherwise ``fraction`` of the rows (at least 2). A pure function of its arguments.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, len(labels)])
  if kind == 'classification':
    picks = [rng.choice(rows, min(per_class, len(rows)), replace=False)
             for rows in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(picks))
  n = min(len(labels), max(2, int(round(fraction * len(labels)))))
  return np.sort(rng.choice(len(labels), n, replace=False))
