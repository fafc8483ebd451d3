"""Scale-out on one process: gradient accumulation, bf16 compute, the 'model' mesh axis."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clu import metric_writers
from jax.sharding import PartitionSpec as P

from faceflax import losses
from faceflax.models import mae
from faceflax.tasks import fbp_kd
from faceflax.train import loop, mesh as mesh_lib, state as state_lib
from tests import configs_for_tests

MLP0 = ('encoder', 'block0', 'MlpBlock_0', 'Dense_0', 'kernel')


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _finetune(workdir, steps=2, batch_size=64, **train):
  """Runs the FBP teacher's fine-tuning stage (deterministic: no dropout, no masking)."""
  config = configs_for_tests.fbp()
  config.teacher.finetune.update(steps=steps, batch_size=batch_size)
  config.train.update(log_every=1, **train)
  job = fbp_kd.Job(config, str(workdir))
  writer = metric_writers.create_default_writer(str(workdir), just_logging=True)
  state = loop.run(job.stage('teacher_finetune'), str(workdir), config.train, job.mesh, writer)
  rows = [json.loads(l) for l in (workdir / 'teacher_finetune' / 'metrics.jsonl').open()]
  return state, rows


def test_micro_batches_are_strided_rows():
  batch = {'x': np.arange(8)}
  np.testing.assert_array_equal(state_lib.micro_batches(batch, 4)['x'],
                                [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_accumulated_sgd_step_equals_the_big_batch_step():
  def loss_fn(params, batch, rng):
    del rng
    err = batch['x'] @ params['w'] - batch['y']
    return jnp.mean(err ** 2), {'mean_err': jnp.mean(err)}

  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(64, 5)).astype(np.float32),
           'y': rng.normal(size=(64,)).astype(np.float32)}
  tx = optax.sgd(0.1)
  state = state_lib.init_state({'w': jnp.ones(5)}, tx)
  update = state_lib.make_update(loss_fn, tx)
  big, big_m = jax.jit(update)(state, batch, jax.random.key(0))
  acc, acc_m = jax.jit(lambda s, b, r: update(s, b, r, grad_accum_steps=4))(
      state, batch, jax.random.key(0))
  np.testing.assert_allclose(acc['params']['w'], big['params']['w'], rtol=1e-6)
  for k in big_m:
    np.testing.assert_allclose(acc_m[k], big_m[k], rtol=1e-5, err_msg=k)


def test_batchnorm_models_refuse_accumulation():
  def loss_fn(params, batch, rng, model_state):
    del batch, rng
    return jnp.sum(params['w']), ({}, model_state)

  tx = optax.sgd(0.1)
  state = state_lib.init_state({'w': jnp.ones(2)}, tx, model_state={'mean': jnp.zeros(2)})
  update = state_lib.make_update(loss_fn, tx)
  with pytest.raises(ValueError, match='BatchNorm'):
    update(state, {'x': jnp.ones((4, 2))}, jax.random.key(0), grad_accum_steps=2)


def test_grad_accumulation_4x16_matches_one_batch_of_64(tmp_path):
  big, big_rows = _finetune(tmp_path / 'big')
  acc, acc_rows = _finetune(tmp_path / 'acc', grad_accum_steps=4)
  for b, a in zip(big_rows, acc_rows):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
    np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-4)
  # Same tolerance as the 1-vs-8-device test: Adam amplifies reduction-order noise
  # in near-zero gradients to a fraction of one step (lr 1e-3).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-4),
               acc['params'], big['params'])


def test_accumulation_must_split_the_batch_over_the_devices(tmp_path):
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    _finetune(tmp_path, grad_accum_steps=3)


def test_bf16_step_is_close_to_fp32_and_keeps_fp32_state(tmp_path):
  results = {}
  for precision in ('fp32', 'bf16'):
    config = configs_for_tests.fbp()
    config.train.precision = precision
    job = fbp_kd.Job(config, str(tmp_path))
    stage = job.stage('teacher_finetune')
    state = jax.jit(stage.init_fn)(jax.random.key(0))
    batch = next(stage.batches(start_step=0))
    forward = lambda p, x: job.teacher.apply({'params': p}, x)['score']
    jaxpr = str(jax.make_jaxpr(forward)(state['params'], batch['image']))
    assert ('bf16' in jaxpr) == (precision == 'bf16')  # the switch reaches the model
    batch = mesh_lib.put_batch(batch, job.mesh)
    update, _ = loop.compile_update(stage, job.mesh, batch, jax.eval_shape(lambda s: s, state))
    for step in range(2):  # the warm-up makes the first step's learning rate 0
      state, metrics = update(state, batch, jax.random.key(step))
    floats = [x for x in jax.tree.leaves((state['params'], state['opt_state']))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    results[precision] = {k: float(v) for k, v in metrics.items()}
  np.testing.assert_allclose(results['bf16']['loss'], results['fp32']['loss'], rtol=3e-2)
  np.testing.assert_allclose(results['bf16']['grad_norm'], results['fp32']['grad_norm'],
                             rtol=1e-1)


def test_losses_are_fp32_for_bf16_inputs():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 9)), jnp.bfloat16)
  cos = jnp.asarray(rng.uniform(-1, 1, size=(4, 6)), jnp.bfloat16)
  labels = jnp.arange(4)
  values = [
      losses.distillation_kl(logits, logits[::-1], 2.0),
      losses.label_distribution_kl(logits, jnp.full(4, 3.0), jnp.linspace(1, 5, 9), 0.5),
      losses.arcface(cos, labels, 64.0, 0.5),
      losses.soft_cross_entropy(logits, jax.nn.softmax(logits.astype(jnp.float32))),
      losses.feature_distillation(logits[:, None], logits[::-1, None]),
      losses.age_kl(logits, jnp.full(4, 3.0), 2.0),
  ]
  assert all(v.dtype == jnp.float32 for v in values)


def test_mlp_kernels_carry_logical_axes():
  model = mae.make('test', image_size=32, patch=8)
  axes = mae.param_axes(model, 32)
  params = mae.init_params(model, jax.random.key(0), 32)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(params)
  assert _get(axes, MLP0) == P('embed', 'mlp')
  assert _get(axes, MLP0[:-2] + ('Dense_1', 'kernel')) == P('mlp', 'embed')
  assert _get(axes, ('encoder', 'norm', 'scale')) == P()


def test_model_axis_shards_mlp_kernels_and_matches_data_parallel(tmp_path):
  data_only, rows1 = _finetune(tmp_path / 'm1', steps=3, batch_size=16)
  config = configs_for_tests.fbp()
  config.teacher.finetune.update(steps=3, batch_size=16)
  config.train.log_every = 1
  config.mesh = {'model': 2}
  job = fbp_kd.Job(config, str(tmp_path / 'm2x'))
  assert dict(job.mesh.shape) == {'data': 4, 'model': 2}
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  state = loop.run(job.stage('teacher_finetune'), str(tmp_path / 'm2x'), config.train, job.mesh,
                   writer)
  kernel = _get(state['params'], MLP0)
  assert kernel.sharding.spec == P(None, 'model')
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2)
  mu = state['opt_state']
  assert any(getattr(x, 'sharding', None) is not None and x.shape == kernel.shape
             and x.sharding.spec == P(None, 'model') for x in jax.tree.leaves(mu))
  rows = [json.loads(l) for l in (tmp_path / 'm2x' / 'teacher_finetune' / 'metrics.jsonl').open()]
  np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in rows1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-4),
               state['params'], data_only['params'])

  # The model-split checkpoint restores into a data-parallel mesh.
  config.mesh = {'model': 1}
  job = fbp_kd.Job(config, str(tmp_path / 'm2x'))
  again = loop.run(job.stage('teacher_finetune'), str(tmp_path / 'm2x'), config.train, job.mesh,
                   writer)
  assert _get(again['params'], MLP0).sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, again['params'], state['params'])


def test_mesh_config_errors():
  with pytest.raises(ValueError, match='unknown axes'):
    mesh_lib.make_mesh({'tensor': 2})
  with pytest.raises(ValueError, match='does not cover'):
    mesh_lib.make_mesh({'data': 3, 'model': 1})
  assert dict(mesh_lib.make_mesh({'model': 4}).shape) == {'data': 2, 'model': 4}


def _first_step(stage, mesh):
  """(the initial state, the metrics of one update) on a fixed random batch over ``mesh``."""
  init, abstract = loop.jit_init(stage, mesh, jax.random.key(0))
  state = init(jax.random.key(0))
  batch = {k: np.random.default_rng(i).uniform(-1, 1, s.shape).astype(s.dtype)
           for i, (k, s) in enumerate(sorted(stage.batch_spec.items()))}
  batch = mesh_lib.put_batch(batch, mesh)
  update, _ = loop.compile_update(stage, mesh, batch, abstract)
  return state, jax.device_get(update(state, batch, jax.random.key(1), *stage.consts)[1])


@pytest.mark.parametrize('task', ['face_prior', 'transfer'])
def test_model_axis_splits_the_vit_of_every_task(task, transfer_data_root, tmp_path):
  from faceflax import tasks  # pylint: disable=g-import-not-at-top
  config = configs_for_tests.load(task, 'test')
  if task == 'transfer':
    config.data.root = str(transfer_data_root)
    job = tasks.get(task).Job(config, str(tmp_path), backbone=False)
    name, prefix = 'finetune_expression', 'backbone'
  else:
    job = tasks.get(task).Job(config, str(tmp_path))
    name, prefix = 'pretrain', 'mae'
  stage = job.stage(name, data=False)
  split, split_metrics = _first_step(stage, mesh_lib.make_mesh({'model': 2}))
  kernel = _get(split['params'][prefix], MLP0)
  assert kernel.sharding.spec == P(None, 'model')
  _, metrics = _first_step(stage, mesh_lib.make_mesh({'model': 1}))
  np.testing.assert_allclose(split_metrics['loss'], metrics['loss'], rtol=1e-5)
