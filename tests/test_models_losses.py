"""MAE shapes and masking invariants; losses and metrics against NumPy/SciPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from faceflax import losses, metrics
from faceflax.models import mae


def _init(model, size, seed=0):
  x = jnp.zeros((2, size, size, 3))
  rngs = {'params': jax.random.key(seed), 'mask': jax.random.key(seed + 1)}
  return model.init(rngs, x, method=model.init_all)['params']


@pytest.mark.parametrize('stem', ['patch', 'multiscale'])
def test_shapes(stem):
  model = mae.make('test', stem=stem, image_size=32, patch=8)
  params = _init(model, 32)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  out = model.apply({'params': params}, x)
  assert out['score'].shape == (3,) and out['logits'].shape == (3, model.num_bins)
  assert len(out['hidden']) == model.depth and out['hidden'][0].shape == (3, 16, model.width)
  lo, hi = model.score_range
  assert np.all((out['score'] >= lo) & (out['score'] <= hi))
  pt = model.apply({'params': params}, x, method=model.pretrain, rngs={'mask': jax.random.key(2)})
  assert pt['pred'].shape == pt['target'].shape == (3, 16, 8 * 8 * 3)
  np.testing.assert_array_equal(pt['mask'].sum(1), [12, 12, 12])  # 75% of 16 tokens


def test_random_masking_invariants():
  keep, mask = mae.random_masking(jax.random.key(0), 5, 64, 0.75)
  keep, mask = np.asarray(keep), np.asarray(mask)
  assert keep.shape == (5, 16)
  for b in range(5):
    assert len(set(keep[b])) == 16                     # no duplicates
    assert np.all(mask[b, keep[b]] == 0)               # kept tokens are unmasked
    assert mask[b].sum() == 48                         # and all others are masked
  assert not np.array_equal(keep[0], keep[1])          # per-example masks


def test_patchify_roundtrip_and_layout():
  x = np.arange(2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
  p = mae.patchify(jnp.asarray(x), 4)
  np.testing.assert_array_equal(p[0, 1], x[0, 0:4, 4:8].reshape(-1))  # row-major patches
  np.testing.assert_array_equal(mae.unpatchify(p, 4), x)


@pytest.mark.parametrize('stem', ['patch', 'multiscale'])
def test_masked_pixels_do_not_reach_the_encoder(stem):
  """Changing pixels of masked patches must not change the prediction of a visible-only encoder."""
  model = mae.make('test', stem=stem, image_size=32, patch=8, decoder_depth=1)
  params = _init(model, 32)
  x = jax.random.normal(jax.random.key(3), (1, 32, 32, 3))
  rngs = {'mask': jax.random.key(7)}
  out = model.apply({'params': params}, x, method=model.pretrain, rngs=rngs)
  pixel_mask = mae.unpatchify(jnp.repeat(out['mask'][..., None], 8 * 8 * 3, -1), 8)
  x2 = x + 5.0 * pixel_mask * jax.random.normal(jax.random.key(4), x.shape)
  out2 = model.apply({'params': params}, x2, method=model.pretrain, rngs=rngs)
  np.testing.assert_allclose(out['pred'], out2['pred'], atol=1e-5)


def test_mae_loss_matches_numpy():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 6, 12)), rng.normal(size=(2, 6, 12)) * 3 + 1
  mask = (rng.random((2, 6)) < 0.5).astype(np.float32)
  mask[0, 0] = 1
  t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  want = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
  got = losses.mae_reconstruction(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  raw = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(losses.mae_reconstruction(pred, target, mask, norm_pix=False), raw,
                             rtol=1e-5)


def test_distillation_kl_matches_numpy():
  rng = np.random.default_rng(1)
  s, t, temp = rng.normal(size=(4, 9)), rng.normal(size=(4, 9)), 2.0

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lt, ls = log_softmax(t / temp), log_softmax(s / temp)
  want = temp ** 2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()
  np.testing.assert_allclose(losses.distillation_kl(s, t, temp), want, rtol=1e-5)
  np.testing.assert_allclose(losses.distillation_kl(t, t, temp), 0.0, atol=1e-6)


def test_feature_distillation_and_masked_regression():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 5, 8)) * 4 + 2
  tn = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  w = np.array([1.0, 0.0, 1.0])
  want = (((s - tn) ** 2).mean((1, 2)) * w).sum() / 2
  np.testing.assert_allclose(losses.feature_distillation(s, t, w), want, rtol=1e-5)
  p, y = np.array([1.0, 2.0, 4.0]), np.array([1.5, 9.0, 3.0])
  np.testing.assert_allclose(losses.score_regression(p, y, w, 'mse'), (0.25 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.score_regression(p, y, None, 'l1'), (0.5 + 7 + 1) / 3, rtol=1e-6)


def test_regression_metrics_match_scipy():
  rng = np.random.default_rng(3)
  y = rng.normal(3, 0.6, 200)
  p = y + rng.normal(0, 0.3, 200)
  r = metrics.regression_report(p, y)
  np.testing.assert_allclose(r['pc'], scipy.stats.pearsonr(p, y)[0], rtol=1e-10)
  np.testing.assert_allclose(r['mae'], np.abs(p - y).mean(), rtol=1e-12)
  np.testing.assert_allclose(r['rmse'], np.sqrt(((p - y) ** 2).mean()), rtol=1e-12)
  assert metrics.pearson(np.ones(5), y[:5]) == 0.0  # constant prediction: defined, not NaN


def test_unknown_variant_and_bad_patch():
  with pytest.raises(ValueError, match='unknown MAE variant'):
    mae.make('huge')
  model = mae.make('test', image_size=30, patch=8)
  with pytest.raises(ValueError, match='not divisible'):
    _init(model, 30)


def test_pool_tokens_matches_numpy():
  from faceflax.tasks.fbp_kd import pool_tokens  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(4).normal(size=(2, 64, 5)).astype(np.float32)  # 8x8 grid
  want = x.reshape(2, 4, 2, 4, 2, 5).mean((2, 4)).reshape(2, 16, 5)
  np.testing.assert_allclose(pool_tokens(jnp.asarray(x), 4), want, rtol=1e-6)
  np.testing.assert_allclose(pool_tokens(jnp.asarray(x), 8), x)
