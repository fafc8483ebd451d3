"""The shared framework: configs, resume, device-count invariance, the whole FBP job."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from clu import metric_writers

from faceflax import app
from faceflax.data import DataError
from faceflax.models import mae
from faceflax.tasks import fbp_kd
from faceflax.train import checkpoint, loop, mesh as mesh_lib, stages
from faceflax.train import state as state_lib
from tests import configs_for_tests
from tests.conftest import REPO, copy_workdir, shared_dataset, xla_flags


def _parse(*overrides):
  return configs_for_tests.parse_flags('fbp_kd', *overrides)


def test_config_overrides_and_unknown_keys():
  config = _parse('--config.seed=7', '--config.student.kd.alpha=0.5', '--config.data.dir=/x')
  assert (config.seed, config.student.kd.alpha, config.data.dir) == (7, 0.5, '/x')
  with pytest.raises(Exception, match='no_such_key'):
    _parse('--config.student.kd.no_such_key=1')
  with pytest.raises(Exception, match='paper2'):
    configs_for_tests.load('fbp_kd', 'paper2')


def test_unknown_stage_and_missing_data_dir(tmp_path):
  config = configs_for_tests.fbp()
  config.stages = 'teacher_pretrain,distill'
  with pytest.raises(ValueError, match='distill'):
    fbp_kd.check_config(config)
  config.data.dir = str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='nowhere'):
    fbp_kd.labeled_examples(config, 'train', str(tmp_path))


def _run_finetune(workdir, config):
  job = fbp_kd.Job(config, str(workdir))
  writer = metric_writers.create_default_writer(str(workdir), just_logging=True)
  return loop.run(job.stage('teacher_finetune'), str(workdir), config.train, job.mesh, writer)


def test_resume_after_kill_gives_the_same_steps(tmp_path):
  config = configs_for_tests.fbp()
  config.train.update(checkpoint_every=2, keep_checkpoints=3)
  full = _run_finetune(tmp_path / 'a', config)
  # Simulate a kill after step 2: drop the later checkpoint and the done marker.
  stage_dir = tmp_path / 'a' / 'teacher_finetune'
  shutil.rmtree(stage_dir / 'ckpt' / '4')
  os.remove(stage_dir / 'done.json')
  resumed = _run_finetune(tmp_path / 'a', config)
  assert int(resumed['step']) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               full['params'], resumed['params'])
  # A finished stage is not redone: it returns the saved state as is.
  again = _run_finetune(tmp_path / 'a', config)
  jax.tree.map(np.testing.assert_array_equal, resumed['params'], again['params'])


def test_one_device_equals_eight_devices(tmp_path):
  results = {}
  for n in (1, 8):
    env = dict(os.environ, XLA_FLAGS=xla_flags(n),
               PYTHONPATH=str(REPO))
    out = tmp_path / f'{n}.npz'
    subprocess.run([sys.executable, str(REPO / 'tests' / 'run_stage_worker.py'),
                    str(tmp_path / f'w{n}'), str(out)], check=True, env=env, cwd=REPO,
                   capture_output=True)
    results[n] = dict(np.load(out))
  assert results[1].pop('devices') == 1 and results[8].pop('devices') == 8
  assert results[1].keys() == results[8].keys()
  one, eight = results[1], results[8]
  np.testing.assert_allclose(one.pop('losses'), eight.pop('losses'), rtol=1e-5)
  np.testing.assert_allclose(one.pop('grad_norms'), eight.pop('grad_norms'), rtol=2e-3)
  # Adam divides by sqrt(v): reduction-order noise in near-zero gradients can
  # move a parameter by a fraction of one step's size (lr = 1e-3 here).
  for k in one:
    np.testing.assert_allclose(one[k], eight[k], rtol=1e-3, atol=3e-4, err_msg=k)


def test_student_kd_init_from_another_run(fbp_job, tmp_path):
  """student.kd.init_from: the KD student starts from a stage of another run (here the session
  job's student_pretrain, read as any run's: strictly, recorded); a model that does not fit
  and a config that also pretrains the student are errors."""
  trained, _ = fbp_job
  config = configs_for_tests.load('fbp_kd', 'test')
  config.update(reuse_from=str(trained), stages='student_kd')
  config.student.kd.init_from = str(trained / 'student_pretrain')
  app.run(config, str(tmp_path / 'from_pretrain'))
  done = json.loads(open(loop.done_marker(str(tmp_path / 'from_pretrain'), 'student_kd')).read())
  expected = json.loads(open(loop.done_marker(str(trained), 'student_kd')).read())['loaded']
  assert done['loaded'] == {**expected, 'from': str(trained / 'student_pretrain')}
  config.student.kd.init_from = str(trained / 'teacher_pretrain')  # the multi-scale teacher
  with pytest.raises(state_lib.PretrainedMismatch, match='student.kd.init_from|teacher_pretrain'):
    app.run(config, str(tmp_path / 'from_teacher'))
  config.stages = 'student_pretrain,student_kd'
  with pytest.raises(ValueError, match='replaces the student_pretrain stage'):
    fbp_kd.check_config(config)


def test_main_job_end_to_end_then_eval_mode(fbp_job, tmp_path):
  config = configs_for_tests.load('fbp_kd', 'test')
  trained, results = fbp_job  # app.run(config, workdir), once per session
  copy_workdir(trained, tmp_path)
  saved = json.loads((tmp_path / 'results.json').read_text())
  for who in ('teacher', 'student'):
    for k in ('pc', 'mae', 'rmse', 'params', 'mflops_per_image'):
      assert np.isfinite(saved[who][k]), (who, k)
    assert saved[who]['n'] == config.data.synthetic.num_val
  assert saved['student']['params'] < saved['teacher']['params']
  assert set(saved['stage_seconds']) == set(fbp_kd.Job.STAGES)
  # What each stage loaded, from where: every parameter of its pretraining stage.
  for stage, source in (('teacher_finetune', 'teacher_pretrain'), ('student_kd', 'student_pretrain')):
    loaded = saved['pretrained'][stage]
    assert loaded['from'] == str(trained / source) and loaded['kept_init'] == []
    assert loaded['loaded'] > 0
  assert results['teacher']['pc'] == saved['teacher']['pc']
  assert list(tmp_path.glob('events.out.tfevents.*'))  # TensorBoard

  # --mode=eval on a fresh folder without a split column scores every row.
  src = tmp_path / 'synthetic_faces'
  fresh = tmp_path / 'fresh_faces'
  shutil.copytree(src / 'images', fresh / 'images')
  rows = (src / 'labels.csv').read_text().splitlines()
  header = rows[0].split(',')
  keep = [i for i, h in enumerate(header) if h != 'split']
  (fresh / 'labels.csv').write_text('\n'.join(
      ','.join(r.split(',')[i] for i in keep) for r in rows[:41]) + '\n')
  config.data.dir = str(fresh)
  evaluated = app.run(config, str(tmp_path), mode='eval')
  saved_eval = json.loads((tmp_path / 'eval_fresh_faces.json').read_text())
  assert saved_eval['teacher']['n'] == 40 == evaluated['student']['n']

  # And on the training run's own val split it reproduces the training figures.
  config.data.dir = str(src)
  config.eval.split = 'val'
  again = app.run(config, str(tmp_path), mode='eval')
  for who in ('teacher', 'student'):
    np.testing.assert_allclose(again[who]['pc'], saved[who]['pc'], rtol=1e-5)


def _garble_step(ckpt_dir, step):
  for p in (ckpt_dir / str(step) / 'default').rglob('*'):
    if p.is_file() and '/d/' in str(p):
      p.write_bytes(os.urandom(len(p.read_bytes())))


def test_eval_with_unreadable_checkpoints_fails_or_scores_what_loads(fbp_job, tmp_path, caplog):
  """--mode=eval: an older step when the newest is damaged (logged, recorded in the JSON);
  a finished model with no readable step at all is an error unless eval.partial."""
  config = configs_for_tests.load('fbp_kd', 'test')
  copy_workdir(fbp_job[0], tmp_path)
  config.data.dir, config.eval.split = str(tmp_path / 'synthetic_faces'), 'val'
  student = tmp_path / 'student_kd' / 'ckpt'
  _garble_step(student, 4)
  with caplog.at_level('WARNING'):
    results = app.run(config, str(tmp_path), mode='eval')
  assert results['restored']['student_kd']['step'] == 2
  assert results['restored']['teacher_finetune']['step'] == 4
  assert 'student_kd: restored step 2' in caplog.text and 'the newest (step 4) is unreadable' in caplog.text
  saved = json.loads((tmp_path / 'eval_synthetic_faces.json').read_text())
  assert saved['restored']['student_kd']['checkpoint'] == str(student)
  _garble_step(student, 2)
  with pytest.raises(checkpoint.CheckpointError, match='eval.partial=True'):
    app.run(config, str(tmp_path), mode='eval')
  config.eval.partial = True
  partial = app.run(config, str(tmp_path), mode='eval')
  assert 'student' not in partial and np.isfinite(partial['teacher']['pc'])
  # Scoring other inputs than the models trained on is refused, naming the key.
  bigger = configs_for_tests.load('fbp_kd', 'test')
  bigger.data.update(dir=config.data.dir, image_size=48)
  with pytest.raises(stages.ConfigChanged, match='data.image_size: trained with 32, now 48'):
    app.run(bigger, str(tmp_path), mode='eval')
  # The workdir of another task: both named (from config.json, else the stage folders).
  lqfr = configs_for_tests.load('lqfr_kd', 'test')
  for _ in range(2):
    with pytest.raises(ValueError, match=r'holds a fbp_kd run, but --config is for task '
                                         r"'lqfr_kd': use configs/fbp_kd.py"):
      app.run(lqfr, str(tmp_path), mode='eval')
    (tmp_path / 'config.json').unlink(missing_ok=True)


def test_real_data_smoke(tmp_path):
  data_dir = shared_dataset('scut_fbp5500')
  config = configs_for_tests.load('fbp_kd', 'test')
  config.data.dir = str(data_dir)
  config.stages = 'teacher_finetune,student_kd,evaluate'
  config.teacher.finetune.from_pretrained = False
  config.student.kd.from_pretrained = False
  results = app.run(config, str(tmp_path))
  assert results['teacher']['n'] == results['student']['n'] > 300  # the val split
  assert np.isfinite(results['student']['rmse'])


def _kd_step(tmp_path, alpha, beta):
  config = configs_for_tests.fbp()
  config.student.kd.update(alpha=alpha, beta=beta, from_pretrained=False)
  job = fbp_kd.Job(config, str(tmp_path))
  teacher = jax.jit(job.stage('teacher_finetune').init_fn)(jax.random.key(5))['params']
  teacher_copy = jax.tree.map(np.asarray, teacher)
  job.provide('teacher_finetune', {'params': teacher})
  stage = job.stage('student_kd')
  state = jax.jit(stage.init_fn)(jax.random.key(0))
  before = jax.tree.map(np.asarray, state['params'])
  batch = mesh_lib.put_batch(next(stage.batches(start_step=0)), job.mesh)
  update, _ = loop.compile_update(stage, job.mesh, batch, jax.eval_shape(lambda s: s, state))
  for step in range(2):  # the warm-up makes the first step's learning rate 0
    state, metrics = update(state, batch, jax.random.key(step), *stage.consts)
  jax.tree.map(np.testing.assert_array_equal, teacher_copy, jax.tree.map(np.asarray, teacher))
  delta = jax.tree.map(lambda a, b: np.asarray(a) - b, state['params'], before)
  return {k: float(v) for k, v in metrics.items()}, delta


def test_kd_terms_reach_the_student_and_leave_the_teacher_frozen(tmp_path):
  with_kd, delta_kd = _kd_step(tmp_path / 'kd', 1.0, 1.0)
  without, delta_plain = _kd_step(tmp_path / 'plain', 0.0, 0.0)
  assert with_kd['output_kd'] >= 0 and with_kd['feature_kd'] > 0
  assert 'output_kd' not in without and 'feature_kd' not in without
  np.testing.assert_allclose(with_kd['score_loss'], without['score_loss'], rtol=1e-6)
  np.testing.assert_allclose(
      with_kd['loss'], with_kd['score_loss'] + with_kd['ld_kl'] + with_kd['output_kd']
      + with_kd['feature_kd'], rtol=1e-5)
  # The KD terms change the student's and the projector's updates (without feature KD
  # the projector only feels weight decay).
  assert not np.allclose(delta_kd['student']['encoder']['block0']['MlpBlock_0']['Dense_0']['kernel'],
                         delta_plain['student']['encoder']['block0']['MlpBlock_0']['Dense_0']['kernel'])
  assert not np.allclose(delta_kd['projector']['proj0']['kernel'],
                         delta_plain['projector']['proj0']['kernel'])


def test_output_kd_score_is_the_squared_error_to_the_teacher_score():
  rng = np.random.default_rng(0)
  s = {'score': rng.uniform(1, 5, 6).astype(np.float32), 'logits': rng.normal(size=(6, 9))}
  t = {'score': rng.uniform(1, 5, 6).astype(np.float32), 'logits': rng.normal(size=(6, 9))}
  cfg = {'output_kd': 'score', 'temperature': 2.0}
  got = fbp_kd.output_kd(ml_collections.ConfigDict(cfg), s, t)
  np.testing.assert_allclose(got, np.mean((s['score'] - t['score']) ** 2), rtol=1e-6)
  # 'kl': Hinton's T^2 * KL(teacher || student) at temperature T, against NumPy
  cfg['output_kd'] = 'kl'
  got = fbp_kd.output_kd(ml_collections.ConfigDict(cfg), s, t)
  log_sm = lambda x: x / 2 - np.log(np.exp(x / 2).sum(-1, keepdims=True))
  pt, ps = log_sm(t['logits']), log_sm(s['logits'])
  np.testing.assert_allclose(got, 4 * np.mean((np.exp(pt) * (pt - ps)).sum(-1)), rtol=1e-5)


def test_flip_tta_scores_are_the_mean_over_the_face_and_its_mirror():
  model = mae.from_config(configs_for_tests.fbp().teacher.model, 32)
  params = jax.jit(lambda rng: mae.init_params(model, rng, 32))(jax.random.key(0))
  kernel = params['head']['dense']['kernel']  # zero-initialised: give the scores some spread
  params['head']['dense']['kernel'] = jax.random.normal(jax.random.key(2), kernel.shape)
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 32, 32, 3)))
  forward = jax.jit(lambda p, im: model.apply({'params': p}, im)['score'])
  one = lambda im: np.asarray(forward(params, im))
  np.testing.assert_allclose(jax.jit(fbp_kd.score_fn(model, False))(params, x), one(x), rtol=1e-6)
  mirrored = one(np.ascontiguousarray(x[:, :, ::-1]))
  assert not np.allclose(mirrored, one(x))  # a random model is not mirror-symmetric
  np.testing.assert_allclose(jax.jit(fbp_kd.score_fn(model, True))(params, x),
                             (one(x) + mirrored) / 2, rtol=1e-5)


def test_finetune_with_ema_and_mixup_hands_on_the_average(tmp_path):
  config = configs_for_tests.fbp()
  config.teacher.finetune.update(ema_decay=0.5, mixup=0.4)
  state = _run_finetune(tmp_path, config)
  diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state['params'],
                      state['ema_params'])
  assert max(jax.tree.leaves(diff)) > 0
  job = fbp_kd.Job(config, str(tmp_path))  # a later stage gets the average (from the checkpoint)
  jax.tree.map(np.testing.assert_array_equal, job.params('teacher_finetune'), state['ema_params'])
  config.student.kd.ema_decay = 1.0
  with pytest.raises(ValueError, match='student.kd.ema_decay=1.0'):
    fbp_kd.check_config(config)


@pytest.mark.parametrize('setting', ['folder', 'off'])
def test_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path, setting):
  cache = tmp_path / 'xla'
  env = dict(os.environ, PYTHONPATH=str(REPO), HOME=str(tmp_path / 'home'),
             FACEFLAX_COMPILATION_CACHE=str(cache) if setting == 'folder' else 'off',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  code = ('import jax, jax.numpy as jnp; from faceflax import app; print(app.use_compilation_cache()); '
          'jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()')
  out = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  if setting == 'off':
    assert out.strip() == '' and not cache.exists() and not (tmp_path / 'home').exists()
  else:
    assert out.strip() == str(cache) and any(cache.iterdir())  # the compiled program is kept


def test_init_compiled_for_start_up_equals_the_default_compile(tmp_path, monkeypatch):
  """``loop.jit_init`` compiles a small state's init unoptimised on CPU (start-up): the
  initial state is the default compile's, to float rounding; a big state keeps the
  defaults (its generation would cost more than the compile saves)."""
  config = configs_for_tests.fbp()
  job = fbp_kd.Job(config, str(tmp_path))
  for name in ('teacher_finetune', 'student_kd'):
    stage = job.stage(name)
    shapes = jax.eval_shape(stage.init_fn, jax.random.key(3))
    assert loop.init_compiler_options(shapes, job.mesh)  # else this compares a compile with itself
    init, _ = loop.jit_init(stage, job.mesh, jax.random.key(3))
    fast, default = init(jax.random.key(3)), jax.jit(stage.init_fn)(jax.random.key(3))
    assert jax.tree.structure(fast) == jax.tree.structure(default)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  monkeypatch.setattr(loop, 'CHEAP_INIT_MAX_ELEMENTS', 1000)
  assert loop.init_compiler_options(shapes, job.mesh) == {}
