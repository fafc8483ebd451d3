"""Numerics of the update against NumPy references: global gradient clipping with layer-wise
learning rates, gradient accumulation of masked losses."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from faceflax.train import optim

LAYER_OF = {'embed': 0, 'block0': 1, 'block1': 2, 'head': 3}


def _params():
  rng = np.random.default_rng(0)
  shapes = {'embed': {'kernel': (3, 2)}, 'block0': {'kernel': (2, 2), 'bias': (2,)},
            'block1': {'kernel': (2, 2)}, 'head': {'kernel': (2, 1), 'bias': (1,)}}
  return {g: {k: rng.normal(size=s).astype(np.float32) for k, s in leaves.items()}
          for g, leaves in shapes.items()}


def _adamw_reference(params, grads_seq, lrs, scales, clip, wd, b1=0.9, b2=0.999, eps=1e-8):
  """AdamW with one global-norm clip over every leaf, then lr * scale of the leaf's group."""
  flat = {(g, k): np.asarray(v, np.float64) for g, leaves in params.items()
          for k, v in leaves.items()}
  m = {key: 0.0 for key in flat}
  v = {key: 0.0 for key in flat}
  for t, grads in enumerate(grads_seq, 1):
    g = {(a, k): np.asarray(x, np.float64) for a, leaves in grads.items() for k, x in leaves.items()}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    g = {key: x * min(1.0, clip / norm) for key, x in g.items()}
    for key, p in flat.items():
      m[key] = b1 * m[key] + (1 - b1) * g[key]
      v[key] = b2 * v[key] + (1 - b2) * g[key] ** 2
      step = (m[key] / (1 - b1 ** t)) / (np.sqrt(v[key] / (1 - b2 ** t)) + eps)
      if p.ndim > 1:
        step = step + wd * p
      flat[key] = p - lrs[t - 1] * scales[key[0]] * step
  return flat


def test_clipping_is_global_across_layer_groups():
  """Several layer groups, gradients far above the threshold: one clip on the global norm
  (per-group clipping would let each group reach the threshold on its own)."""
  config = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, weight_decay=0.05,
                                          grad_clip=1.0, layer_decay=0.5))
  params = _params()
  tx, sched = optim.adamw(config, 10, params, lambda path: LAYER_OF[path.split('/')[0]], 3)
  rng = np.random.default_rng(1)
  # Step sizes differ by 100x, so the second and third steps' Adam moments depend on how
  # much the first step's gradient was clipped.
  grads_seq = [jax.tree.map(lambda p, s=s: (s * rng.normal(size=p.shape)).astype(np.float32),
                            params) for s in (30.0, 0.3, 5.0)]
  state, p = tx.init(params), params
  for grads in grads_seq:
    updates, state = tx.update(grads, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  scales = {g: 0.5 ** (3 - i) for g, i in LAYER_OF.items()}
  want = _adamw_reference(params, grads_seq, [float(sched(i)) for i in range(3)], scales,
                          clip=1.0, wd=0.05)
  for (group, key), value in want.items():
    np.testing.assert_allclose(p[group][key], value, rtol=2e-5, atol=1e-6,
                               err_msg=f'{group}/{key}')
