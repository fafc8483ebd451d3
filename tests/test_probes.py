"""The linear-probe library (faceflax/probes.py) against closed forms and brute force."""
import numpy as np

from faceflax import probes


def test_ridge_matches_lstsq():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (60, 5))  # uncentred: the bias must stay unpenalised
  y = x @ rng.normal(size=(5, 2)) + rng.normal(size=(60, 2)) + 4.0
  for lam in (0.0, 0.3):
    w, b = probes.ridge_fit(x, y, lam)
    # mean((x w + b - y)^2) + lam |w|^2 == |[x 1; sqrt(n lam) I 0] [w; b] - [y; 0]|^2 / n
    a = np.block([[x, np.ones((60, 1))], [np.sqrt(60 * lam) * np.eye(5), np.zeros((5, 1))]])
    ref = np.linalg.lstsq(a, np.concatenate([y, np.zeros((5, 2))]), rcond=None)[0]
    np.testing.assert_allclose(w, ref[:5], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b, ref[5], rtol=1e-6, atol=1e-8)


def test_ridge_leave_one_out_is_exact():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(25, 4)), rng.normal(size=25)
  lams = (1e-3, 0.1, 10.0)
  brute = []
  for lam in lams:  # refit without row i, same total penalty n * lam
    errs = []
    for i in range(25):
      keep = np.arange(25) != i
      w, b = probes.ridge_fit(x[keep], y[keep], lam * 25 / 24)
      errs.append((x[i] @ w + b - y[i]) ** 2)
    brute.append(np.mean(errs))
  np.testing.assert_allclose(probes.ridge_loo_errors(x, y, lams), brute, rtol=1e-8)
  # More features than rows: no penalty interpolates, so its LOO error is infinite.
  x = rng.normal(size=(6, 10))
  errors = probes.ridge_loo_errors(x, rng.normal(size=6), (0.0, 1.0))
  assert errors[0] == np.inf and np.isfinite(errors[1])
  assert probes.ridge_select(x, rng.normal(size=6), (0.0, 1.0))[2] == 1.0


def test_logistic_probe_fits_separable_features():
  rng = np.random.default_rng(1)
  centers = rng.normal(0, 4, (4, 8))
  labels = rng.integers(0, 4, 400)
  x = (centers[labels] + rng.normal(0, 0.5, (400, 8))).astype(np.float32)
  w, b = probes.logistic_fit(x[:300], labels[:300], 'classification', 4, l2=1e-4)
  assert np.mean((x[300:] @ w + b).argmax(1) == labels[300:]) >= 0.99
  # A subset by zero weights is the same fit as the subset itself.
  rows = np.arange(0, 300, 3)
  sub = probes.logistic_fit(x[rows], labels[rows], 'classification', 4, l2=1e-2)
  by_rows = probes.logistic_fit(x[:300], labels[:300], 'classification', 4, l2=1e-2, rows=rows)
  for got, want in zip(by_rows, sub):
    np.testing.assert_allclose(got, want, atol=2e-3)
  # Multilabel: one independent logistic regression per output.
  x = rng.normal(size=(400, 6)).astype(np.float32)
  x[:, :3] += np.sign(x[:, :3])  # a margin around 0 on the labelled coordinates
  y = (x[:, :3] > 0).astype(np.float32)
  w, b = probes.logistic_fit(x[:300], y[:300], 'multilabel', 3, l2=1e-4)
  assert np.mean(((x[300:] @ w + b) > 0) == y[300:]) >= 0.99
  assert np.all(np.isfinite(w))


def test_fewshot_sampler_is_deterministic_and_balanced():
  labels = np.array([0] * 30 + [1] * 3 + [2] * 20 + [3] * 12)
  draw = lambda seed: probes.fewshot_indices(labels, seed, 'classification', per_class=5)
  a = draw(0)
  np.testing.assert_array_equal(a, draw(0))
  assert not np.array_equal(a, draw(1))
  assert np.bincount(labels[a]).tolist() == [5, 3, 5, 5]  # all of the 3-face class
  assert len(set(a.tolist())) == len(a) and a.min() >= 0 and a.max() < len(labels)
  rows = probes.fewshot_indices(np.arange(500.0), 2, 'regression', fraction=0.02)
  assert len(rows) == 10 and rows.max() < 500
  np.testing.assert_array_equal(rows, probes.fewshot_indices(np.arange(500.0), 2, 'regression',
                                                               fraction=0.02))
  assert len(probes.fewshot_indices(np.zeros((40, 3)), 0, 'multilabel', fraction=0.02)) == 2


def test_kernel_ridge_leave_one_out_is_exact_and_selects_by_it():
  """Brute force: refit without each row (the mean of all rows kept, as documented)."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(30, 3))
  y = np.sin(2 * x[:, 0]) + 0.1 * rng.normal(size=30) + 3.0
  gammas, lams = (0.1, 1.0), (1e-3, 0.1, 10.0)
  fit = probes.kernel_ridge_select(x, y, gammas, lams)
  mean, errors = y.mean(), {}
  for gamma in gammas:
    for lam in lams:
      loo = []
      for i in range(30):
        keep = np.arange(30) != i
        k = probes.rbf_kernel(x[keep], x[keep], gamma)
        alpha = np.linalg.solve(k + lam * np.eye(29), y[keep] - mean)
        loo.append(probes.rbf_kernel(x[i:i + 1], x[keep], gamma)[0] @ alpha + mean)
      errors[gamma, lam] = (np.mean((np.array(loo) - y) ** 2), np.array(loo))
  best = min(errors, key=lambda p: errors[p][0])
  assert (fit.gamma, fit.lam) == best
  np.testing.assert_allclose(fit.loo_predictions, errors[best][1], rtol=1e-8)
  # Prediction: the closed form on all rows, in chunks.
  k = probes.rbf_kernel(x, x, fit.gamma)
  alpha = np.linalg.solve(k + fit.lam * np.eye(30), y - mean)
  new = rng.normal(size=(7, 3))
  np.testing.assert_allclose(fit(new, chunk=3), probes.rbf_kernel(new, x, fit.gamma) @ alpha + mean,
                             rtol=1e-8)
