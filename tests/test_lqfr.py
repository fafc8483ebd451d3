"""Low-quality face recognition job: end to end, KD gradients, external teacher, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from faceflax import app, verification
from faceflax.data import identities as identities_lib, synthetic
from faceflax.data.errors import DataError
from faceflax.models import resnext_cbam
from faceflax.tasks import lqfr_kd
from faceflax.train import mesh as mesh_lib
from tests import configs_for_tests
from tests.conftest import copy_workdir


@pytest.fixture(scope='module')
def identities(tmp_path_factory):
  s = configs_for_tests.load('lqfr_kd', 'test').data.synthetic
  return synthetic.write_identity_dataset(
      tmp_path_factory.mktemp('ids'), num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids,
      per_id=s.per_id, num_pairs=s.num_pairs, size=s.size, seed=s.seed)


def _config(data_dir=''):
  config = configs_for_tests.load('lqfr_kd', 'test')
  config.data.dir = str(data_dir)
  return config


def test_end_to_end_then_eval_mode(lqfr_job, tmp_path):
  # The session's job (teacher, student_both) rerun with one more student: only
  # student_nokd trains, the finished stages are reused as they are.
  copy_workdir(lqfr_job[0], tmp_path)
  config = _config()
  config.stages = 'teacher,student_both,student_nokd,evaluate'
  results = app.run(config, str(tmp_path))
  for name in ('teacher', 'student_both'):
    assert (json.loads((tmp_path / name / 'done.json').read_text())
            == json.loads((lqfr_job[0] / name / 'done.json').read_text()))
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert set(saved) >= {'teacher', 'student_both', 'student_nokd', 'data', 'stage_seconds'}
  for who in ('teacher', 'student_both', 'student_nokd'):
    table = saved[who]
    assert set(table) >= {'hq', '8px_both', '8px_probe_vs_hq', 'params', 'gflops_per_image'}
    for cell in ('hq', '8px_both', '8px_probe_vs_hq'):
      assert 0.0 <= table[cell]['accuracy'] <= 1.0
  assert saved['data']['num_pairs'] == config.data.synthetic.num_pairs
  assert results['teacher']['hq']['accuracy'] == saved['teacher']['hq']['accuracy']
  # The students' logged terms (unweighted; the loss weighs them): none in the no-KD one.
  kd = config.student.kd
  for who, weights in (('student_both', {'output_kd': kd.alpha, 'attention_kd': kd.beta}),
                       ('student_nokd', {})):
    rows = [json.loads(line) for line in (tmp_path / who / 'metrics.jsonl').open()]
    assert [r['step'] for r in rows] == [2, 4]
    for row in rows:
      assert set(row) - {'step', 'grad_norm', 'train_accuracy'} == {'loss', 'arcface', *weights}
      assert row['loss'] == pytest.approx(
          row['arcface'] + sum(w * row[k] for k, w in weights.items()), rel=1e-5)
  # --mode=eval scores the same models the same way.
  config.data.dir = str(tmp_path / 'synthetic_identities')
  again = app.run(config, str(tmp_path), mode='eval')
  for who in ('teacher', 'student_both'):
    np.testing.assert_allclose(again[who]['hq']['accuracy'], saved[who]['hq']['accuracy'])


def _student_setup(config, workdir, name):
  job = lqfr_kd.Job(config, str(workdir))
  teacher = job.stage('teacher')
  job.provide('teacher', jax.jit(teacher.init_fn)(jax.random.key(1)))
  stage = job.stage(name)
  state = jax.jit(stage.init_fn)(jax.random.key(2))
  batch = {k: jnp.asarray(v) for k, v in next(stage.batches(start_step=0)).items()}
  return job, stage, state, batch


def test_kd_terms_reach_the_student_not_the_teacher(identities, tmp_path):
  config = _config(identities)
  job, stage, state, batch = _student_setup(config, tmp_path, 'student_both')
  assert {'image', 'image_lq', 'label'} <= set(batch)
  assert not np.array_equal(batch['image'], batch['image_lq'])  # the student sees degraded faces
  teacher_vars = stage.consts[0]
  rng = jax.random.key(0)

  def term(name, params, tvars):
    _, (terms, _) = stage.loss_fn(params, batch, rng, tvars, model_state=state['model_state'])
    return terms[name]

  # One jitted program for every gradient: op by op, the ResNeXt would take minutes.
  @jax.jit
  def grads(params, tvars):
    return {name: jax.grad(term, argnums=(1, 2))(name, params, tvars)
            for name in ('output_kd', 'attention_kd')}

  for name, (g_student, g_teacher) in grads(state['params'], teacher_vars).items():
    assert float(jax.tree.reduce(lambda a, x: a + jnp.sum(jnp.abs(x)), g_student, 0.0)) > 0, name
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_teacher)), name
  # The update changes the student and returns no teacher state at all.
  new_state, metrics = jax.jit(stage.update_fn)(state, batch, rng, teacher_vars)
  assert set(new_state) == {'params', 'opt_state', 'step', 'model_state'}
  assert {'arcface', 'output_kd', 'attention_kd', 'loss'} <= set(metrics)
  assert np.isfinite(float(metrics['loss']))


def test_external_teacher(identities, tmp_path):
  config = _config(identities)
  n = sum(1 for _ in open(f'{identities}/labels.csv')) - 1
  emb = np.random.default_rng(0).normal(size=(n, 24)).astype(np.float32)
  config.data.external_teacher = 'ext.npy'
  np.save(f'{identities}/ext.npy', emb)
  _, stage, state, batch = _student_setup(config, tmp_path, 'student_external')
  assert state['params']['projector']['kernel'].shape[1] == 24
  ts = lqfr_kd.train_set(config)
  external = lambda: identities_lib.row_embeddings(lqfr_kd.external_path(config),
                                                   config.data.dir, ts.rows)
  np.testing.assert_array_equal(external(), emb[ts.rows])
  _, metrics = jax.jit(stage.update_fn)(state, batch, jax.random.key(0), *stage.consts)
  assert np.isfinite(float(metrics['output_kd'])) and 'attention_kd' not in metrics

  np.save(f'{identities}/ext.npy', emb[:-1])  # one row short
  with pytest.raises(DataError, match='ext.npy.*one row per'):
    external()


def test_evaluation_embeddings_are_exact_over_padded_batches(identities):
  config = _config(identities)
  config.eval_batch_size = 24  # does not divide the number of images
  mesh = mesh_lib.make_mesh()
  ts = lqfr_kd.train_set(config)
  model = resnext_cbam.recognizer(config.teacher.model, ts.num_classes)
  variables = resnext_cbam.init_variables(model, jax.random.key(0), config.data.image_size)
  paths, _ = verification.eval_pairs(config)
  emb = verification.embed(model, variables, paths, config, mesh, 'hq')
  assert emb.shape[0] == len(paths)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
  config.eval_batch_size = 8
  np.testing.assert_allclose(verification.embed(model, variables, paths, config, mesh, 'hq'), emb,
                             atol=1e-5)
