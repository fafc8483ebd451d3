"""Age estimation job: end to end, --mode=eval, each age loss, heads off, overrides, bad input."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from faceflax import app
from faceflax.data import synthetic
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples
from faceflax.models import resnet_msa
from faceflax.tasks import age_mtmsa
from faceflax.train import mesh as mesh_lib
from tests import configs_for_tests
from tests.conftest import REPO, copy_workdir, shared_dataset

NUM_TRAIN, NUM_VAL = 32, 16


def write_faces(root):
  """A tiny folder-format age dataset: drawn faces with random ages, some labels unknown."""
  (root / 'images').mkdir()
  images, _ = synthetic.make_faces(NUM_TRAIN + NUM_VAL, size=32, seed=0)
  rng = np.random.default_rng(0)
  rows = []
  for i, image in enumerate(images):
    Image.fromarray(image).save(root / 'images' / f'{i:03d}.png')
    gender = '' if i % 7 == 3 else str(rng.integers(2))  # empty = unknown
    race = '-1' if i % 5 == 1 else str(rng.integers(5))
    rows.append((f'{i:03d}.png', int(rng.integers(1, 90)), gender, race,
                 'train' if i < NUM_TRAIN else 'val'))
  with open(root / 'labels.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('filename', 'age', 'gender', 'race', 'split'), *rows])
  return root


@pytest.fixture
def faces(age_faces):
  """write_faces's dataset, made once per session (conftest.py)."""
  return age_faces


def _config(data_dir, **loss):
  config = configs_for_tests.load('age_mtmsa', 'test')
  config.data.dir = str(data_dir)
  config.loss.update(loss)
  return config


def _one_step(config, workdir):
  job = age_mtmsa.Job(config, str(workdir))
  stage = job.stage('train')
  state = stage.init_fn(jax.random.key(0))  # eager: its small ops compile once per session
  batch = {k: jnp.asarray(v) for k, v in next(stage.batches(start_step=0)).items()}
  _, metrics = jax.jit(stage.update_fn)(state, batch, jax.random.key(1))
  return job, state, metrics


def test_end_to_end_then_eval_mode(faces, age_job, tmp_path):
  config = _config(faces)
  trained, results = age_job  # app.run(config, workdir), once per session
  copy_workdir(trained, tmp_path)
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert set(saved) >= {'age', 'gender', 'race', 'model', 'data', 'stage_seconds'}
  assert 'age_group' not in saved  # no age-group labels in this dataset
  assert saved['age']['n'] == NUM_VAL and saved['data']['split'] == 'val'
  for value in (saved['age']['mae'], saved['age']['cs5'], saved['model']['gflops_per_image']):
    assert np.isfinite(value) and value >= 0
  for head in ('gender', 'race'):
    assert 0 <= saved[head]['accuracy'] <= 1 and 0 < saved[head]['n'] < NUM_VAL  # unknowns left out
  assert saved['model']['params'] > 0 and saved['model']['heads'] == ['age', 'gender', 'race']
  assert results['age']['mae'] == saved['age']['mae']
  # --mode=eval scores the same model the same way.
  config.eval.split = 'val'
  again = app.run(config, str(tmp_path), mode='eval')
  assert (tmp_path / f'eval_{faces.name}.json').exists()
  for key in ('mae', 'cs5'):
    np.testing.assert_allclose(again['age'][key], saved['age'][key], rtol=1e-6)
  np.testing.assert_allclose(again['gender']['accuracy'], saved['gender']['accuracy'])


@pytest.mark.parametrize('kind', age_mtmsa.AGE_LOSSES)
def test_each_age_loss_trains_a_step(faces, tmp_path, kind):
  _, _, metrics = _one_step(_config(faces, age=kind), tmp_path)
  assert {'loss', 'age_loss', 'train_mae', 'gender_loss', 'race_loss'} <= set(metrics)
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_switched_off_heads_are_absent(faces, tmp_path):
  config = _config(faces)
  config.model.heads = ('age',)  # what --config.model.heads=age gives
  job, state, metrics = _one_step(config, tmp_path)
  assert not {'gender', 'race'} & set(state['params'])
  assert 'gender_loss' not in metrics and 'race_loss' not in metrics
  job.provide('train', state)
  val = age_mtmsa.load_examples(config, 'val')
  pred = age_mtmsa.predict(job.model, job.variables(), val, config, job.mesh)
  assert set(pred) == {'age'} and pred['age'].shape == (NUM_VAL,)
  assert set(age_mtmsa.score(pred, val)) == {'age'}


def test_unknown_labels_are_masked_out():
  logits = jnp.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
  labels = jnp.array([-1, 0, 1])
  want = -np.mean([jax.nn.log_softmax(logits[1])[0], jax.nn.log_softmax(logits[2])[1]])
  np.testing.assert_allclose(age_mtmsa.masked_cross_entropy(logits, labels), want, rtol=1e-6)
  assert float(age_mtmsa.masked_cross_entropy(logits, jnp.full(3, -1))) == 0.0
  grad = jax.grad(lambda z: age_mtmsa.masked_cross_entropy(z, labels))(logits)
  assert np.all(np.asarray(grad[0]) == 0)


def test_age_groups_and_predictions():
  np.testing.assert_array_equal(age_mtmsa.age_to_group([0, 3, 5, 13.9, 14.4, 33, 61, 90]),
                                [0, 0, 1, 2, 3, 4, 7, 7])
  out = {'age_logits': jnp.log(jnp.array([[0.5, 0.5, 0.0]]) + 1e-30),
         'age_mean': jnp.array([1.7])}
  np.testing.assert_allclose(age_mtmsa.predicted_age(out, 'kl'), [0.5], atol=1e-6)
  np.testing.assert_allclose(age_mtmsa.predicted_age(out, 'l1'), [1.7])
  groups = Examples('adience', ('a', 'b', 'c'), {
      'age': np.array([3.0, 28.5, 50.5], np.float32), 'gender': np.array([0, -1, 1]),
      'race': np.full(3, -1), 'age_group': np.array([0, 4, 6])})
  report = age_mtmsa.score({'age': np.array([1.0, 17.0, 50.0]), 'gender': np.array([0, 0, 0]),
                            'race': np.zeros(3)}, groups)
  assert report['age_group'] == {'exact': 2 / 3, 'one_off': 1.0, 'n': 3}
  assert report['gender'] == {'accuracy': 0.5, 'n': 2} and 'race' not in report  # no known race


def test_official_utkface_names(tmp_path):
  for name in ('25_1_2_20170116174525125.jpg.chip.jpg', '3_0_0_20170110215648859.jpg.chip.jpg',
               '39_1_20170116174525125.jpg.chip.jpg'):  # the last one lacks its race
    Image.new('RGB', (8, 8)).save(tmp_path / name, format='JPEG')
  config = _config(tmp_path)
  config.data.format = 'utkface'
  examples = age_mtmsa.load_examples(config, None)  # every file, malformed ones skipped
  assert sorted(examples.labels['age'].tolist()) == [3, 25]
  assert set(examples.labels['age_group'].tolist()) == {-1}


def test_unknown_names_are_clear_errors(faces, tmp_path):
  with pytest.raises(ValueError, match=r"loss.age='mse'.*kl, dirac_gaussian, l1, ce"):
    age_mtmsa.check_config(_config(faces, age='mse'))
  config = _config(faces)
  config.model.heads = ('age', 'emotion')
  with pytest.raises(ValueError, match=r"model.heads: unknown head\(s\) \['emotion'\]"):
    app.run(config, str(tmp_path))
  config.model.heads = ('gender,race',)  # --config.model.heads=gender,race
  with pytest.raises(ValueError, match='age head is required'):
    age_mtmsa.check_config(config)
  config = _config(faces)
  config.data.format = 'csv'
  with pytest.raises(ValueError, match='data.format.*folder, utkface, morph, adience'):
    age_mtmsa.check_config(config)
  config = _config(tmp_path / 'missing')
  with pytest.raises(DataError, match='data.dir=.*missing.*not a directory'):
    app.run(config, str(tmp_path / 'w'))
  config = _config(faces)
  config.data.eval_split = 'tset'
  with pytest.raises(DataError, match="split 'tset'"):  # before any training
    app.run(config, str(tmp_path / 'w2'))
  assert not (tmp_path / 'w2' / 'train').exists()


def test_bad_folder_labels(tmp_path):
  (tmp_path / 'images').mkdir()
  Image.new('RGB', (8, 8)).save(tmp_path / 'images' / 'a.png')
  (tmp_path / 'labels.csv').write_text('filename,age,gender\na.png,30,M\n')
  with pytest.raises(DataError, match="column 'gender' must hold integer codes"):
    age_mtmsa.load_examples(_config(tmp_path), None)
  (tmp_path / 'labels.csv').write_text('filename,age,gender\na.png,130,1\n')
  with pytest.raises(DataError, match=r'outside 0..116 \(model.max_age\)'):
    age_mtmsa.load_examples(_config(tmp_path), None)


@pytest.mark.parametrize('overrides, want', [
    (['--config.model.msa_stages=()'], dict(msa_stages=(), heads=('age', 'gender', 'race'))),
    (['--config.model.msa_stages=(0,)', '--config.model.msa_rates=(1,2,3)'],
     dict(msa_stages=(0,), msa_rates=(1, 2, 3))),
    (['--config.model.heads=age'], dict(heads=('age',))),
    (['--config.model.heads=age,gender'], dict(heads=('age', 'gender'))),
    (['--config.model.heads=("age","race")'], dict(heads=('age', 'race'))),
])
@pytest.mark.filterwarnings('ignore:the load_module')  # ml_collections' config loader
def test_tuple_overrides_parse_like_main(overrides, want):
  """The command-line overrides of the config docstring, through ml_collections' flags."""
  argv = ['main.py', f'--config={REPO}/configs/age_mtmsa.py:test', *overrides, '--config.seed=3']
  flag_values = flags.FlagValues()
  # As in main.py; the override flags are found in argv when the config flag is defined.
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  for key, value in want.items():
    got = resnet_msa.parse_heads(config.model.heads) if key == 'heads' else tuple(config.model[key])
    assert got == value, key
  assert config.train.seed == 3  # the loop's seed follows config.seed
  model = resnet_msa.from_config(config.model, config.data.image_size)
  assert tuple(model.msa_stages) == tuple(config.model.msa_stages)


def test_real_utkface_through_the_config_path():
  config = configs_for_tests.load('age_mtmsa', 'test')
  root = shared_dataset('utkface')
  assert (REPO / config.data.dir).resolve() == root.resolve()
  config.data.dir = str(REPO / config.data.dir)  # the default, independent of the cwd
  val = age_mtmsa.load_examples(config, config.data.eval_split)
  labels = val.labels
  assert len(val) > 500 and 1 <= labels['age'].min() and labels['age'].max() <= 116
  assert set(np.unique(labels['gender'])) == {0, 1}
  assert set(np.unique(labels['race'])) <= set(range(5))
  some = val.select(np.arange(16))
  model = resnet_msa.from_config(config.model, config.data.image_size)
  variables = resnet_msa.init_variables(model, jax.random.key(0), config.data.image_size)
  pred = age_mtmsa.predict(model, variables, some, config, mesh_lib.make_mesh())
  report = age_mtmsa.score(pred, some)
  assert np.isfinite(report['age']['mae']) and report['age']['n'] == 16
  assert set(report) == {'age', 'gender', 'race'}
