"""ResNeXt-CBAM shapes and attention maps; ArcFace and face-KD losses against NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceflax import losses
from faceflax.models import heads, resnext_cbam


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(model, size, batch=2):
  """Variables and outputs as shapes only (jax.eval_shape): no real compute."""
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return variables, jax.eval_shape(model.apply, variables, x)


@pytest.fixture(scope='module')
def tiny():
  """The 'test' model, its variables and a batch of 32 px faces; initialised once (compiling the
  random initialisers dominates this file's run time on CPU)."""
  model = resnext_cbam.make('test')
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=-1, maxval=1)
  return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_test_variant_shapes_and_attention_ranges(tiny):
  model, variables, x = tiny
  out = jax.jit(model.apply)(variables, x)
  assert out['embedding'].shape == (3, model.embed_dim)
  assert out['embedding'].dtype == jnp.float32
  widths = model.stage_widths()
  assert [m.shape for m in out['channel_attention']] == [(3, w) for w in widths]
  assert [m.shape for m in out['spatial_attention']] == [(3, 8, 8), (3, 4, 4), (3, 2, 2)]
  for m in out['channel_attention'] + out['spatial_attention']:
    assert np.all((np.asarray(m) > 0) & (np.asarray(m) < 1))


def test_resnext50_shapes_and_parameter_count():
  model = resnext_cbam.make('resnext50_32x4d')
  variables, out = _abstract(model, 112)
  assert out['embedding'].shape == (2, 512)
  assert [m.shape for m in out['channel_attention']] == [(2, c) for c in (256, 512, 1024, 2048)]
  assert [m.shape for m in out['spatial_attention']] == [(2, s, s) for s in (56, 28, 14, 7)]
  params = variables['params']
  backbone = _count(params) - _count(params['head'])
  cbam = sum(_count(block['cbam']) for block in params.values() if 'cbam' in block)
  # torchvision resnext50_32x4d: 25,028,904 parameters, of which the fc layer has 2,049,000.
  # Ours has a 3x3 instead of a 7x7 stem and per-channel PReLU slopes.
  np.testing.assert_allclose(backbone - cbam, 25_028_904 - 2_049_000, rtol=0.02)
  # CBAM adds 2.53M to ResNeXt-50 (Woo et al. 2018, Table 4: 25.03M -> 27.56M).
  np.testing.assert_allclose(cbam, 27.56e6 - 25.03e6, rtol=0.02)
  plain, _ = _abstract(resnext_cbam.make('resnext50_32x4d', attention=False), 112)
  assert _count(plain['params']) == _count(params) - cbam


def test_student_maps_match_small():
  _, small = _abstract(resnext_cbam.make('small'), 112)
  student_model = resnext_cbam.make('student')
  _, student = _abstract(student_model, 112)
  for key in ('channel_attention', 'spatial_attention'):
    assert [m.shape for m in student[key]] == [m.shape for m in small[key]]
  assert len(student['spatial_attention']) == 4
  assert student['spatial_attention'][-1].shape == (2, 4, 4)  # 112 -> 56 -> 28 -> 14 -> 7 -> 4
  assert sum(student_model.stage_sizes) < sum(resnext_cbam.VARIANTS['small']['stage_sizes'])


def test_attention_off_returns_no_maps():
  """attention=False: same embedding, no CBAM parameters and empty (not all-ones) map tuples."""
  variables, out = _abstract(resnext_cbam.make('test', attention=False), 32)
  assert out['embedding'].shape == (2, resnext_cbam.VARIANTS['test']['embed_dim'])
  assert out['channel_attention'] == () and out['spatial_attention'] == ()
  assert not any('cbam' in block for block in variables['params'].values())


def test_grouped_conv_is_grouped(tiny):
  model, variables, _ = tiny
  in_width = model.stage_widths()[1] // model.expansion
  kernel = variables['params']['stage1_block0']['Conv_1']['kernel']
  assert kernel.shape == (3, 3, in_width // model.cardinality, in_width)


# (side, strides, the output has fewer pixels than the 3x3 window: the patch-matmul path)
@pytest.mark.parametrize('side,strides,as_matmul', [(7, 1, False), (7, 2, False), (3, 1, False),
                                                    (4, 2, True), (2, 1, True), (3, 2, True)])
def test_per_group_conv_matches_native_values_and_gradients(side, strides, as_matmul):
  x = jax.random.normal(jax.random.key(0), (2, side, side, 12))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 8))  # 4 groups: 12 -> 8 channels

  def loss(x, kernel, conv):
    y = conv(x, kernel, (strides, strides), ((1, 1), (1, 1)),
             dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
    return jnp.sum(jnp.sin(y)), y

  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  (gx, gk), y = grad(x, kernel, resnext_cbam.per_group_conv)
  (gx_native, gk_native), y_native = grad(x, kernel, jax.lax.conv_general_dilated)
  np.testing.assert_allclose(y, y_native, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_native, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, gk_native, rtol=1e-5, atol=1e-5)
  program = str(jax.make_jaxpr(loss, static_argnums=2)(x, kernel, resnext_cbam.per_group_conv))
  assert ('conv_general_dilated' not in program) == as_matmul


def test_native_and_per_group_models_agree(tiny):
  model, variables, x = tiny
  native = jax.jit(model.clone(grouped_conv='native').apply)(variables, x)
  per_group = jax.jit(model.clone(grouped_conv='per_group').apply)(variables, x)
  np.testing.assert_allclose(per_group['embedding'], native['embedding'], rtol=1e-4, atol=1e-4)


def test_train_updates_batch_stats_and_dropout(tiny):
  model, variables, x = tiny
  model = model.clone(dropout=0.5)
  train_apply = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                       rngs={'dropout': rng}))
  out, updates = train_apply(variables, x, jax.random.key(3))
  stats = variables['batch_stats']
  assert not np.allclose(updates['batch_stats']['stem_norm']['mean'], stats['stem_norm']['mean'])
  assert not np.allclose(updates['batch_stats']['head']['embed_norm']['var'],
                         stats['head']['embed_norm']['var'])
  assert out['embedding'].shape == (3, model.embed_dim)
  other, _ = train_apply(variables, x, jax.random.key(4))
  assert not np.allclose(other['embedding'], out['embedding'])  # dropout is active in training


def test_bfloat16_compute_keeps_fp32_outputs(tiny):
  model, variables, x = tiny
  bf16 = model.clone(dtype=jnp.bfloat16)
  out = jax.jit(bf16.apply)(variables, x)
  assert out['embedding'].dtype == jnp.float32
  assert all(m.dtype == jnp.float32 for m in out['spatial_attention'])
  np.testing.assert_allclose(out['embedding'], jax.jit(model.apply)(variables, x)['embedding'],
                             rtol=0.05, atol=0.02)
  bf16_params, _ = _abstract(bf16, 32)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16_params))


def test_arcface_head_returns_cosines():
  head = heads.ArcFaceHead(num_classes=5)
  emb = jax.random.normal(jax.random.key(0), (4, 8)) * 10
  params = head.init(jax.random.key(1), emb)
  cos = np.asarray(head.apply(params, emb))
  w = np.asarray(params['params']['weight'])
  e = np.asarray(emb)
  want = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
  assert cos.shape == (4, 5) and cos.dtype == np.float32
  np.testing.assert_allclose(cos, want, rtol=1e-5, atol=1e-6)


def _arcface_numpy(cos, labels, scale, margin):
  theta = np.arccos(np.clip(cos, -1 + 1e-7, 1 - 1e-7))
  logits = cos.copy()
  for b, y in enumerate(labels):
    if theta[b, y] + margin > np.pi:
      logits[b, y] = cos[b, y] - margin * np.sin(margin)
    else:
      logits[b, y] = np.cos(theta[b, y] + margin)
  return scale * logits


def _cross_entropy_numpy(logits, labels):
  z = logits - logits.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -log_p[np.arange(len(labels)), labels]


def test_arcface_matches_numpy_including_fallback():
  rng = np.random.default_rng(0)
  cos = rng.uniform(-0.9, 0.9, (4, 6)).astype(np.float32)
  labels = np.array([0, 3, 5, 2])
  cos[1, 3] = -0.95  # theta + 0.5 > pi: the fallback branch
  cos[2, 5] = 0.99
  scale, margin = 64.0, 0.5
  want = _arcface_numpy(cos.astype(np.float64), labels, scale, margin)
  assert np.arccos(-0.95) + margin > np.pi
  got = losses.arcface_logits(cos, labels, scale, margin)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[1, 3], scale * (-0.95 - margin * np.sin(margin)), rtol=1e-5)
  w = np.array([1.0, 1.0, 0.0, 1.0])
  np.testing.assert_allclose(losses.arcface(cos, labels, scale, margin, w),
                             (_cross_entropy_numpy(want, labels) * w).sum() / 3, rtol=1e-4)
  # margin 0: plain softmax over scaled cosines.
  np.testing.assert_allclose(losses.arcface_logits(cos, labels, scale, 0.0), scale * cos,
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(losses.arcface(cos, labels, scale, 0.0),
                             _cross_entropy_numpy(scale * cos.astype(np.float64), labels).mean(),
                             rtol=1e-4)
  grads = jax.grad(lambda c: losses.arcface(c, labels, scale, margin))(jnp.asarray(cos))
  assert np.all(np.isfinite(grads))


def test_embedding_distillation_matches_numpy():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(3, 8)), rng.normal(size=(3, 8)) * 5
  sn = s / np.linalg.norm(s, axis=1, keepdims=True)
  tn = t / np.linalg.norm(t, axis=1, keepdims=True)
  w = np.array([1.0, 0.0, 1.0])
  np.testing.assert_allclose(losses.embedding_distillation(s, t, 'cosine'),
                             (1 - (sn * tn).sum(1)).mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.embedding_distillation(s, t, 'l2', w),
                             (((sn - tn) ** 2).sum(1) * w).sum() / 2, rtol=1e-5)
  grad_t = jax.grad(lambda t: losses.embedding_distillation(s, t))(jnp.asarray(t))
  np.testing.assert_array_equal(grad_t, 0.0)  # the teacher is a fixed target
  with pytest.raises(ValueError, match='kind'):
    losses.embedding_distillation(s, t, 'l1')


def test_similarity_distillation_matches_numpy():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)) * 3
  cos = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
      x / np.linalg.norm(x, axis=1, keepdims=True)).T
  pairs = ~np.eye(5, dtype=bool)
  np.testing.assert_allclose(losses.similarity_distillation(s, t),
                             ((cos(s) - cos(t))[pairs] ** 2).mean(), rtol=1e-5)
  # Any rotation of the teacher's embeddings keeps its cosines: nothing to learn.
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  assert float(losses.similarity_distillation(t @ q, t)) < 1e-10
  grad_t = jax.grad(lambda t: losses.similarity_distillation(s, t))(jnp.asarray(t))
  np.testing.assert_array_equal(grad_t, 0.0)


def _attention_transfer_numpy(student, teacher):
  out = []
  for s, t in zip(student, teacher):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    out.append(((s - t) ** 2).sum(1).mean())
  return np.mean(out)


def test_attention_transfer_matches_numpy_and_invariances():
  rng = np.random.default_rng(2)
  student = [rng.uniform(size=(3, 16)), rng.uniform(size=(3, 4, 4))]
  teacher = [rng.uniform(size=(3, 16)), rng.uniform(size=(3, 4, 4))]
  got = losses.attention_transfer(student, teacher)
  np.testing.assert_allclose(got, _attention_transfer_numpy(student, teacher), rtol=1e-5)
  np.testing.assert_allclose(losses.attention_transfer(teacher, teacher), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.attention_transfer([3.7 * s for s in student], teacher), got,
                             rtol=1e-5)
  w = np.array([0.0, 1.0, 1.0])
  np.testing.assert_allclose(
      losses.attention_transfer(student, teacher, w),
      _attention_transfer_numpy([s[1:] for s in student], [t[1:] for t in teacher]), rtol=1e-5)
  grads = jax.grad(losses.attention_transfer, argnums=1)(student, teacher)
  assert all(np.all(g == 0) for g in grads)


def test_attention_transfer_resizes_spatial_maps():
  rng = np.random.default_rng(3)
  student, teacher = rng.uniform(size=(2, 4, 4)), rng.uniform(size=(2, 8, 8))
  resized = np.asarray(jax.image.resize(student, (2, 8, 8), method='bilinear'))
  np.testing.assert_allclose(losses.attention_transfer([student], [teacher]),
                             _attention_transfer_numpy([resized], [teacher]), rtol=1e-5)


def test_attention_transfer_rejects_mismatched_channel_maps():
  with pytest.raises(ValueError, match=r'pair 1: student map \(2, 8\).*teacher map \(2, 16\)'):
    losses.attention_transfer([np.ones((2, 4, 4)), np.ones((2, 8))],
                              [np.ones((2, 4, 4)), np.ones((2, 16))])
  with pytest.raises(ValueError, match='number of maps'):
    losses.attention_transfer([], [])


def test_unknown_variant_and_family_registered():
  from faceflax import models  # pylint: disable=g-import-not-at-top
  assert models.get('resnext_cbam') is resnext_cbam
  with pytest.raises(ValueError, match='unknown ResNeXt-CBAM variant'):
    resnext_cbam.make('resnext101')
