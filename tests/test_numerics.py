"""Numerics of the update against NumPy references: global gradient clipping with layer-wise
learning rates, gradient accumulation of masked losses."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from faceflax import losses
from faceflax.train import optim, state as state_lib

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


# ----------------------------------------------------------------------------- pretrained

def _tree(**shapes):
  """{'group': {'leaf': zeros}} from keyword 'group__leaf'=shape, values = a counter."""
  tree = {}
  for i, (key, shape) in enumerate(shapes.items()):
    group, leaf = key.split('__')
    tree.setdefault(group, {})[leaf] = np.full(shape, float(i + 1), np.float32)
  return tree


def test_pretrained_weights_load_strictly():
  model = _tree(encoder__kernel=(4, 4), encoder__bias=(4,), head__kernel=(4, 3), head__bias=(3,))
  fresh = jax.tree.map(lambda x: -x, model)
  pretrained = {'encoder': {'kernel': np.ones((4, 4)), 'bias': np.ones(4)},
                'head': {'kernel': np.ones((4, 9))}, 'decoder': {'kernel': np.ones((2, 2))}}
  # Every misfit is listed with both shapes; nothing loads in part.
  with pytest.raises(state_lib.PretrainedMismatch,
                     match=r"W/pre does not fit the model \(2 parameter\(s\)\): "
                           r"head/bias: model \(3,\), pretrained missing; "
                           r"head/kernel: model \(4, 3\), pretrained \(4, 9\)"):
    state_lib.load_pretrained(fresh, pretrained, where='W/pre')
  # The head may keep its init when the config says so; the rest is the checkpoint's.
  params, facts = state_lib.load_pretrained(fresh, pretrained, 'head/*', where='W/pre')
  np.testing.assert_array_equal(params['encoder']['kernel'], np.ones((4, 4)))
  np.testing.assert_array_equal(params['head']['kernel'], fresh['head']['kernel'])
  assert facts == {'from': 'W/pre', 'loaded': 2, 'kept_init': ['head/bias', 'head/kernel'],
                   'not_used': 1}
  with pytest.raises(state_lib.PretrainedMismatch, match=r"\['haed/\*'\] match no parameter"):
    state_lib.load_pretrained(fresh, pretrained, ['head/*', 'haed/*'])


# ----------------------------------------------------------------------------- accumulation

def test_accumulating_masked_means_equals_the_big_batch():
  """A loss with a plain mean over rows, a mean over labeled rows and a mean over a random
  mask (counts differ between micro-batches): k micro-batches give the big batch's step."""
  def loss_fn(params, batch, rng):
    pred = batch['x'] @ params['w']
    labeled = batch['labeled']
    del rng  # the masks come with the rows, so both runs see the same ones
    drawn = (batch['x'][:, 0] > 0.3).astype(jnp.float32) * batch['keep']
    score = losses.masked_mean((pred - batch['y']) ** 2, labeled)
    sparse = losses.masked_mean(jnp.abs(pred), drawn)
    plain = jnp.mean(pred ** 2)
    loss = 2.0 * score + 0.5 * sparse + plain
    return loss, {'score': score, state_lib.MASKED: {
        'labeled': (2.0 * score, labeled.sum()), 'drawn': (0.5 * sparse, drawn.sum())}}

  rng = np.random.default_rng(0)
  n = 32
  batch = {'x': rng.normal(size=(n, 5)).astype(np.float32),
           'y': rng.normal(size=(n,)).astype(np.float32),
           'labeled': (rng.random(n) < np.linspace(0.1, 0.9, n)).astype(np.float32),
           'keep': (rng.random(n) < 0.8).astype(np.float32)}
  tx = optax.sgd(0.1)
  state = state_lib.init_state({'w': jnp.linspace(-1, 1, 5)}, tx)
  update = state_lib.make_update(loss_fn, tx)
  big, big_m = jax.jit(update)(state, batch, jax.random.key(0))
  for k in (2, 4, 8):
    counts = state_lib.micro_batches(batch, k)['labeled'].sum(1)
    assert len(set(np.asarray(counts).tolist())) > 1  # the counts differ
    acc, acc_m = jax.jit(lambda s, b, r, k=k: update(s, b, r, grad_accum_steps=k))(
        state, batch, jax.random.key(0))
    np.testing.assert_allclose(acc['params']['w'], big['params']['w'], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(acc_m['loss'], big_m['loss'], rtol=1e-5)
    np.testing.assert_allclose(acc_m['grad_norm'], big_m['grad_norm'], rtol=1e-5)
    assert state_lib.MASKED not in acc_m


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize('dtype, rtol', [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_fused_attention_equals_flax_attention(dtype, rtol):
  """The MAE's attention through jax.nn.dot_product_attention (the default) against flax's
  own: same parameters, same outputs and gradients (fp32: float tolerance; bf16: its
  rounding), for the encoder's tokens and the MAE pretraining loss."""
  from faceflax.models import mae  # pylint: disable=g-import-not-at-top
  images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  models = {a: mae.make('test', image_size=32, patch=8, dtype=dtype, attention=a)
            for a in ('fused', 'flax')}
  params = models['flax'].init({'params': jax.random.key(1), 'mask': jax.random.key(2)},
                               images, method=models['flax'].init_all)['params']

  def loss(model, p):
    out = model.apply({'params': p}, images, method=model.pretrain,
                      rngs={'mask': jax.random.key(3)})
    return losses.mae_reconstruction(out['pred'], out['target'], out['mask'])

  tokens = {a: m.apply({'params': params}, images, method=m.tokens)[0] for a, m in models.items()}
  np.testing.assert_allclose(np.asarray(tokens['fused'], np.float32),
                             np.asarray(tokens['flax'], np.float32), rtol=rtol, atol=rtol)
  grads = {a: jax.grad(lambda p, m=m: loss(m, p))(params) for a, m in models.items()}
  flat = {a: jax.tree.leaves(g) for a, g in grads.items()}
  # One scale for all: the key biases' gradients are zero in exact arithmetic (softmax
  # ignores a constant shift), ~1e-10 of rounding in both paths.
  scale = max(float(jnp.max(jnp.abs(g))) for g in flat['flax'])
  for fused, ref in zip(flat['fused'], flat['flax']):
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(ref, np.float32),
                               rtol=rtol * 5, atol=rtol * scale)


@pytest.mark.parametrize('remat', ['block', 'dots'])
def test_remat_keeps_the_gradients_and_shrinks_the_activation_memory(remat):
  """Rematerialised blocks: the same parameters, loss and gradients (same ops, float
  tolerance), and less temporary memory in XLA's analysis of the compiled gradient. XLA:CPU's
  default scheduler ignores memory (remat then saves nothing on CPU); its memory-optimised
  one, like the accelerators' schedulers, keeps the recomputation next to its use."""
  from faceflax.models import mae  # pylint: disable=g-import-not-at-top
  images = jax.random.uniform(jax.random.key(0), (16, 32, 32, 3), minval=-1, maxval=1)
  models = {r: mae.make('test', image_size=32, patch=4, remat=r) for r in ('none', remat)}
  params = {r: mae.init_params(m, jax.random.key(1), 32) for r, m in models.items()}
  jax.tree.map(np.testing.assert_array_equal, params['none'], params[remat])  # same names too

  def grad_fn(model):
    def loss(p):
      out = model.apply({'params': p}, images, train=True, method=model.pretrain,
                        rngs={'mask': jax.random.key(3)})
      return losses.mae_reconstruction(out['pred'], out['target'], out['mask'])
    return jax.jit(jax.value_and_grad(loss))

  memory_first = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  compiled = {r: grad_fn(m).lower(params['none']).compile(memory_first)
              for r, m in models.items()}
  (l0, g0), (l1, g1) = (compiled[r](params['none']) for r in ('none', remat))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
  temp = {r: c.memory_analysis().temp_size_in_bytes for r, c in compiled.items()}
  assert temp[remat] < temp['none'], temp


# ----------------------------------------------------------------------------- EMA, mixup

def test_weight_ema_follows_the_numpy_recursion():
  """Plain SGD on a quadratic, 5 steps: ema_params is the warmed-up exponential average."""
  tx = optax.sgd(0.1)
  loss_fn = lambda p, batch, rng: (jnp.sum((p['w'] - batch['x']) ** 2), {})
  update = jax.jit(state_lib.make_update(loss_fn, tx, ema_decay=0.9))
  state = state_lib.init_state({'w': jnp.array([1.0, -2.0])}, tx, ema=True)
  x = np.array([0.5, 0.5], np.float32)
  w, ema = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  for t in range(5):
    state, _ = update(state, {'x': x}, jax.random.key(0))
    w = w - 0.1 * 2 * (w - x)
    d = min(0.9, (1 + t) / (10 + t))
    ema = d * ema + (1 - d) * w
  np.testing.assert_allclose(state['params']['w'], w, rtol=1e-6)
  np.testing.assert_allclose(state['ema_params']['w'], ema, rtol=1e-6)
  np.testing.assert_array_equal(state_lib.trained_params(state)['w'], state['ema_params']['w'])
  assert state_lib.trained_params({'params': 1}) == 1  # no EMA: the last weights


def test_mixup_mixes_images_and_targets_with_one_weight_per_row():
  from faceflax.train import mixing
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(6, 4, 4, 3)).astype(np.float32),
           'score': rng.normal(size=(6,)).astype(np.float32),
           'has_label': np.array([1, 1, 0, 1, 1, 1], np.float32),
           'id': np.arange(6, dtype=np.int32)}
  out = jax.tree.map(np.asarray, mixing.mixup(jax.random.key(3), batch, 0.4,
                                              weight_keys=('has_label',)))
  prev = lambda x: np.roll(x, 1, axis=0)
  # Each row's weight, read off its score, mixes its image the same way.
  lam = (out['score'] - prev(batch['score'])) / (batch['score'] - prev(batch['score']))
  assert np.all((lam >= 0.5 - 1e-5) & (lam <= 1 + 1e-5)) and np.ptp(lam) > 0
  want = lam[:, None, None, None] * batch['image'] + (1 - lam[:, None, None, None]) * prev(batch['image'])
  np.testing.assert_allclose(out['image'], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out['has_label'], [1, 1, 0, 0, 1, 1])  # row 3 mixes in row 2
  np.testing.assert_array_equal(out['id'], batch['id'])  # integers are left alone


@pytest.mark.parametrize('task', ['fbp_kd', 'lqfr_kd', 'age_mtmsa', 'face_prior'])
def test_paper_presets_compute_in_bf16_on_accelerators_only(task, monkeypatch):
  from faceflax.train import precision  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  train = configs_for_tests.load(task, 'paper').train
  assert train.precision == 'auto'
  assert precision.compute_dtype(train) == jnp.float32  # these tests run on CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert precision.compute_dtype(train) == jnp.bfloat16
  with pytest.raises(ValueError, match=r"config.train.precision='fp16'"):
    precision.compute_dtype({'precision': 'fp16'})


@pytest.mark.parametrize('stem', ['patch', 'multiscale'])
def test_mae_init_through_a_small_copy_gives_the_full_size_parameters(stem):
  """mae.init_params initialises a 4x4-token copy: the same parameters, bit for bit, as the
  model initialised at its own image size."""
  from faceflax.models import mae  # pylint: disable=g-import-not-at-top
  model = mae.make('test', image_size=64, patch=8, stem=stem, stem_stride=2)
  x = jnp.zeros((1, 64, 64, 3))
  rng = jax.random.key(5)
  rngs = {'params': rng, 'mask': jax.random.fold_in(rng, 1), 'dropout': jax.random.fold_in(rng, 2)}
  full = model.init(rngs, x, method=model.init_all)['params']
  jax.tree.map(np.testing.assert_array_equal, mae.init_params(model, rng, 64), full)


def test_age_init_on_a_small_face_gives_the_full_size_variables():
  from faceflax.models import resnet_msa  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  config = configs_for_tests.load('age_mtmsa', 'test')
  model = resnet_msa.from_config(config.model, config.data.image_size)  # any input size
  rng = jax.random.key(4)
  full = model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, 80, 80, 3)))
  jax.tree.map(np.testing.assert_array_equal, resnet_msa.init_variables(model, rng, 80), full)


def test_face_prior_init_without_the_training_forward_gives_the_same_parameters():
  from faceflax.data import face_regions  # pylint: disable=g-import-not-at-top
  from faceflax.models import mae  # pylint: disable=g-import-not-at-top
  from faceflax.tasks import face_prior  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  config = configs_for_tests.load('face_prior', 'test')
  model, size = mae.from_config(config.model, config.data.image_size), config.data.image_size
  heads = face_prior.PriorHeads(len(face_regions.REGIONS), model.width)
  rng, x = jax.random.key(3), jnp.zeros((1, size, size, 3))
  rngs = {'params': rng, 'mask': jax.random.fold_in(rng, 1), 'dropout': jax.random.fold_in(rng, 2)}
  params = model.init(rngs, x, method=model.init_all)['params']
  out = model.apply({'params': params}, x, method=model.pretrain, rngs=rngs)  # the full-size way
  full = {'mae': params, 'prior': heads.init(jax.random.fold_in(rng, 3), out['latent'],
                                             out['decoded'])['params']}
  jax.tree.map(np.testing.assert_array_equal, face_prior.init_params(model, heads, rng, size), full)
