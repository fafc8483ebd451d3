"""Age estimation parts: ResNet-MSA, age losses and metrics against NumPy/SciPy, age readers."""
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import scipy.special
import scipy.stats

from faceflax import losses, metrics, models
from faceflax.data import DataError, age_datasets, read_folder
from faceflax.models import resnet_msa
from tests.conftest import shared_dataset

NUM_AGES = 117  # 0..116
HEAD_PARAMS = ('age', 'age_gaussian', 'gender', 'race')


def _log_softmax(z):
  return scipy.special.log_softmax(np.asarray(z, np.float64), axis=-1)


# Losses.

def test_gaussian_label_distribution_truncates_and_renormalises():
  ages, sigma = np.array([0.0, 30.4, 116.0]), np.array([2.0, 3.0, 4.0])
  got = np.asarray(losses.gaussian_label_distribution(ages, NUM_AGES, sigma))
  k = np.arange(NUM_AGES)
  density = scipy.stats.norm.pdf(k, ages[:, None], sigma[:, None])
  np.testing.assert_allclose(got, density / density.sum(1, keepdims=True), atol=1e-7)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
  # At the ends the cut-off mass (~40% for age 0) is spread over the kept ages.
  np.testing.assert_allclose(got[0, 0], density[0, 0] / density[0].sum(), rtol=1e-5)
  assert got[0, 0] > 1.6 * density[0, 0] and got[2].argmax() == 116
  scalar = losses.gaussian_label_distribution(ages, NUM_AGES, 2.0)
  np.testing.assert_allclose(scalar[0], got[0], atol=1e-7)


def test_age_kl_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, NUM_AGES)) * 2
  ages, sigma = np.array([0.0, 25.0, 71.6, 116.0]), 2.5
  k = np.arange(NUM_AGES)
  log_p = _log_softmax(-0.5 * ((k - ages[:, None]) / sigma) ** 2)
  kl = (np.exp(log_p) * (log_p - _log_softmax(logits))).sum(1)
  np.testing.assert_allclose(losses.age_kl(logits, ages, sigma), kl.mean(), rtol=1e-5)
  w = np.array([1.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(losses.age_kl(logits, ages, sigma, w), (kl * w).sum() / 3, rtol=1e-5)
  np.testing.assert_allclose(losses.age_kl(log_p, ages, sigma), 0.0, atol=1e-5)  # Perfect fit.


def test_expected_age_and_baselines():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, NUM_AGES))
  probs = np.exp(_log_softmax(logits))
  np.testing.assert_allclose(losses.expected_age(logits), probs @ np.arange(NUM_AGES), rtol=1e-5)
  peaked = np.full((2, NUM_AGES), -1e4)
  peaked[0, 0], peaked[1, 116] = 0, 0
  np.testing.assert_allclose(losses.expected_age(peaked), [0, 116], atol=1e-4)

  ages, w = np.array([0.0, 40.2, 116.0]), np.array([1.0, 1.0, 0.0])
  np.testing.assert_allclose(losses.age_l1(np.array([3.0, 40.0, 100.0]), ages, w),
                             (3.0 + 0.2) / 2, rtol=1e-5)
  ce = -_log_softmax(logits)[np.arange(3), [0, 40, 116]]
  np.testing.assert_allclose(losses.age_cross_entropy(logits, ages), ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.age_cross_entropy(logits, ages, w), ce[:2].mean(), rtol=1e-5)


def _dirac_gaussian_reference(mean, sigma, age):
  k = np.arange(NUM_AGES)
  mass = (scipy.stats.norm.cdf(k + 0.5, mean, sigma) - scipy.stats.norm.cdf(k - 0.5, mean, sigma))
  return -np.log(mass[int(round(age))] / mass.sum())


def test_dirac_gaussian_kl_matches_scipy():
  mean = np.array([0.0, 3.0, 30.0, 110.0, 116.0, 50.0])
  sigma = np.array([1.0, 2.0, 7.5, 3.0, 0.8, 20.0])
  ages = np.array([0.0, 0.0, 33.0, 116.0, 116.0, 41.6])  # Range ends; 41.6 rounds to 42.
  want = [_dirac_gaussian_reference(m, s, a) for m, s, a in zip(mean, sigma, ages)]
  got = jax.jit(jax.vmap(lambda m, s, a: losses.dirac_gaussian_kl(m, s, a, NUM_AGES)))(
      jnp.asarray(mean), jnp.log(sigma), jnp.asarray(ages))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  w = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(
      losses.dirac_gaussian_kl(mean, np.log(sigma), ages, NUM_AGES, w),
      np.dot(want, w) / 4, rtol=2e-5)
  # sigma below min_sigma is clipped to it.
  np.testing.assert_allclose(
      losses.dirac_gaussian_kl(np.array([20.3]), np.array([-20.0]), np.array([20.0]), NUM_AGES),
      _dirac_gaussian_reference(20.3, 0.1, 20.0), rtol=1e-4)


def test_dirac_gaussian_kl_far_off_is_finite_with_gradient():
  """Where the probability of the label underflows, the loss is still exact and differentiable."""
  mean, sigma, age = 116.0, 0.5, 0.0
  a, b = (age - 0.5 - mean) / sigma, (age + 0.5 - mean) / sigma
  log_mass = scipy.special.log_ndtr(b) + np.log1p(-np.exp(
      scipy.special.log_ndtr(a) - scipy.special.log_ndtr(b)))
  log_norm = np.log(scipy.stats.norm.cdf(NUM_AGES - 0.5, mean, sigma)
                    - scipy.stats.norm.cdf(-0.5, mean, sigma))
  loss_fn = lambda m, ls: losses.dirac_gaussian_kl(m, ls, jnp.array([age]), NUM_AGES)
  mean_j, log_sigma_j = jnp.array([mean]), jnp.log(jnp.array([sigma]))
  np.testing.assert_allclose(loss_fn(mean_j, log_sigma_j), log_norm - log_mass, rtol=1e-4)
  grads = jax.grad(loss_fn, argnums=(0, 1))(mean_j, log_sigma_j)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert grads[0][0] > 0 and grads[1][0] < 0  # Move the mean down, widen sigma.


# Metrics.

def test_age_and_classification_metrics_match_numpy():
  rng = np.random.default_rng(2)
  true = rng.integers(0, 90, 50).astype(float)
  pred = true + rng.normal(0, 6, 50)
  report = metrics.age_report(pred, true)
  np.testing.assert_allclose(report['mae'], np.abs(pred - true).mean(), rtol=1e-12)
  assert report['cs5'] == np.mean(np.abs(pred - true) <= 5) and report['n'] == 50
  assert metrics.age_report([10, 15.0], [5, 5])['cs5'] == 0.5  # |err| = 5 counts.

  labels = np.array([0, 1, 1, -1, 0, 1])
  assert metrics.accuracy(np.array([0, 1, 0, 1, 1, 1]), labels) == 3 / 5  # -1 left out.
  groups = np.array([0, 3, 7, 4, -1, 2])
  got = metrics.group_accuracy(np.array([0, 4, 5, 4, 0, 0]), groups)
  assert got == {'exact': 2 / 5, 'one_off': 3 / 5, 'n': 5}
  with pytest.raises(ValueError, match='shape'):
    metrics.accuracy([0, 1], [0, 1, 1])


# ResNet-MSA. Compiling is the slow part on CPU: shapes come from jax.eval_shape,
# and the tests that compute share one initialised 'test' model.

def _shapes(model, size, batch=2):
  """Variables and outputs as shapes only, without compiling or running the model."""
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return variables, jax.eval_shape(model.apply, variables, x)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def test_model():
  model = resnet_msa.make('test')
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))


@pytest.mark.parametrize('rate', [1, 2, 5])
def test_one_dilated_conv_spans_2r_plus_1(rate):
  conv = nn.Conv(1, (3, 3), padding=rate, kernel_dilation=rate, use_bias=False)
  x = jnp.zeros((1, 21, 21, 1)).at[0, 10, 10, 0].set(1.0)
  y = conv.apply({'params': {'kernel': jnp.ones((3, 3, 1, 1))}}, x)[0, :, :, 0]
  rows, cols = np.nonzero(np.asarray(y))
  assert np.ptp(rows) + 1 == np.ptp(cols) + 1 == 2 * rate + 1
  assert len(rows) == 9  # Only 3x3 taps: a lone dilated convolution grids.


def _msa_support(rates, size=41):
  """Pixels where the MSA map differs from its no-signal value for a centred delta input.

  Positive weights, zero biases and unit BatchNorm statistics keep every path
  alive through the ReLUs, so the support is exactly the receptive field.
  """
  module = resnet_msa.MultiScaleAttention(rates, reduction=1, min_channels=2)
  x = jnp.zeros((1, size, size, 4)).at[0, size // 2, size // 2].set(1.0)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.full(s.shape, 0.0 if path[-1].key == 'bias' else 0.1),
      shapes['params'])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.full(s.shape, 1.0 if path[-1].key == 'var' else 0.0),
      shapes['batch_stats'])
  _, attention = jax.jit(module.apply)({'params': params, 'batch_stats': stats}, x)
  return np.asarray(attention[0, :, :, 0]) > 0.5


@pytest.mark.parametrize('rates', [(1, 2, 5), (1, 2, 3), (2,)])
def test_msa_receptive_field_matches_closed_form(rates):
  support = _msa_support(rates)
  rows, cols = np.nonzero(support)
  side = resnet_msa.dilated_receptive_field(rates)
  assert side == 1 + 2 * sum(rates)
  assert np.ptp(rows) + 1 == np.ptp(cols) + 1 == side
  if rates[0] == 1:  # Hybrid dilation: the stacked field is dense, no gridding.
    assert support.sum() == side ** 2


def test_msa_rates_with_common_factor_grid():
  support = _msa_support((2, 4))
  assert support[20, 20] and not support[20, 21] and support.sum() == 7 ** 2


def test_test_variant_outputs(test_model):
  model, variables = test_model
  assert {'msa1', 'age', 'age_gaussian', 'gender', 'race'} <= set(variables['params'])
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  out = jax.jit(model.apply)(variables, x)
  assert out['age_logits'].shape == (3, NUM_AGES) and out['age_logits'].dtype == jnp.float32
  assert out['age_mean'].shape == out['age_log_sigma'].shape == (3,)
  assert np.all((out['age_mean'] >= 0) & (out['age_mean'] <= 116))
  assert out['gender_logits'].shape == (3, 2) and out['race_logits'].shape == (3, 5)
  (attention,) = out['attention']
  assert attention.shape == (3, 8, 8, 1)  # 32 px, stride-2 stem, stage 1 halves again.
  np.testing.assert_allclose(attention, 0.5)  # The fusion starts at zero.


def test_train_step_reaches_the_trunk_and_updates_batch_stats(test_model):
  model, variables = test_model
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  ages = jnp.array([0.0, 20.0, 60.0, 116.0])

  def loss_fn(params):
    out, updates = model.apply({**variables, 'params': params}, x, train=True,
                               mutable=['batch_stats'])
    loss = (losses.dirac_gaussian_kl(out['age_mean'], out['age_log_sigma'], ages, NUM_AGES)
            + losses.age_kl(out['age_logits'], ages, 2.0)
            + losses.age_cross_entropy(out['gender_logits'], jnp.array([0, 1, 1, 0])))
    return loss, updates['batch_stats']
  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.abs(grads['stem']['kernel']).sum() > 0  # Reached through the shortcuts.
  assert np.abs(grads['msa1']['fuse']['kernel']).sum() > 0
  assert jax.tree.structure(stats) == jax.tree.structure(variables['batch_stats'])
  assert not np.allclose(stats['stem_bn']['mean'], variables['batch_stats']['stem_bn']['mean'])


@pytest.mark.parametrize('size', [40, 41])
def test_max_pool_matches_reduce_window_values_and_gradient(size):
  """The slices formulation against flax's reduce-window max-pool (odd and even sides; no
  ties in random data, so the gradients agree exactly too)."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  cotangent = jax.random.normal(jax.random.key(1), resnet_msa.max_pool(x, 3, 2, 1).shape)
  ours = lambda x: resnet_msa.max_pool(x, 3, 2, 1)
  reference = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_array_equal(ours(x), reference(x))
  grad = lambda f: jax.vjp(f, x)[1](cotangent)[0]
  np.testing.assert_allclose(grad(ours), grad(reference), atol=1e-6)


def test_resnet34_shapes_and_param_count_without_compute():
  variables, out = _shapes(resnet_msa.make('resnet34'), 224)
  params = variables['params']
  trunk = {k: v for k, v in params.items() if k not in HEAD_PARAMS and not k.startswith('msa')}
  assert _count(trunk) == 21_284_672  # torchvision's ResNet34 without its fc layer.
  assert 21.3e6 < _count(params) < 22.5e6
  assert out['age_logits'].shape == (2, NUM_AGES) and out['race_logits'].shape == (2, 5)
  assert [a.shape for a in out['attention']] == [(2, 28, 28, 1), (2, 14, 14, 1)]
  assert out['pooled'].shape == (2, 512)


def test_no_msa_stages_is_the_plain_resnet():
  plain, out = _shapes(resnet_msa.make('test', msa_stages=()), 32)
  assert not any(k.startswith('msa') for k in plain['params']) and out['attention'] == ()
  with_msa, _ = _shapes(resnet_msa.make('test'), 32)
  without = {k: v for k, v in with_msa['params'].items() if not k.startswith('msa')}
  assert jax.tree.map(lambda s: s.shape, without) == jax.tree.map(lambda s: s.shape,
                                                                   plain['params'])
  big, _ = _shapes(resnet_msa.make('resnet34', msa_stages=()), 64, batch=1)
  assert _count({k: v for k, v in big['params'].items() if k not in HEAD_PARAMS}) == 21_284_672


def test_heads_switch_off():
  variables, out = _shapes(resnet_msa.make('test', heads=('age',)), 32)
  assert 'age_logits' in out and 'gender_logits' not in out and 'race_logits' not in out
  assert not {'gender', 'race'} & set(variables['params'])
  variables, out = _shapes(resnet_msa.make('test', heads=('gender', 'race')), 32)
  assert not {'age', 'age_gaussian'} & set(variables['params'])
  assert not {'age_logits', 'age_mean', 'age_log_sigma'} & set(out)
  assert out['gender_logits'].shape == (2, 2)
  with pytest.raises(ValueError, match='unknown heads'):
    _shapes(resnet_msa.make('test', heads=('age', 'emotion')), 32)
  with pytest.raises(ValueError, match='msa_stages'):
    _shapes(resnet_msa.make('test', msa_stages=(2,)), 32)


def test_registry():
  assert models.get('resnet_msa') is resnet_msa
  with pytest.raises(ValueError, match='unknown ResNet-MSA variant'):
    resnet_msa.make('resnet1000')


# UTKFace file names.

@pytest.mark.parametrize('name, want', [
    ('1_0_0_20161219140623097.jpg.chip.jpg', (1, 0, 0)),
    ('116_1_4_20170120134639935.jpg', (116, 1, 4)),
    ('part1/0_1_3_20170109150557335.jpg', (0, 1, 3)),
])
def test_parse_utkface_name(name, want):
  assert age_datasets.parse_utkface_name(name) == want


@pytest.mark.parametrize('name, why', [
    ('39_1_20170116174525125.jpg.chip.jpg', 'race field missing'),
    ('x_1_2_20170116174525125.jpg', "age field 'x' is not an integer"),
    ('25_1_-1_20170116174525125.jpg', "race field '-1' is not an integer"),
    ('117_1_2_20170116174525125.jpg', 'age 117 is outside 0..116'),
    ('25_2_2_20170116174525125.jpg', 'gender 2 is outside 0..1'),
    ('25_1_5_20170116174525125.jpg', 'race 5 is outside 0..4'),
    ('25_1_2_2017x.jpg', "date&time field '2017x'"),
    ('25_1_2.jpg', 'expected 4'),
])
def test_parse_utkface_name_malformed(name, why):
  with pytest.raises(DataError, match=rf'^{name.split("_")[0]}_.*: {why}'):
    age_datasets.parse_utkface_name(name)


def _write_image(path, value=80):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new('RGB', (4, 4), (value, 255 - value, 0)).save(path, format='PNG')


def test_read_utkface_split_and_malformed(tmp_path):
  names = [f'{age}_{age % 2}_{age % 5}_2017010{age % 10}1200{age:03d}.jpg.chip.jpg'
           for age in range(1, 80)]
  for name in names:
    _write_image(tmp_path / 'UTKFace' / name)
  (tmp_path / 'UTKFace' / 'notes.txt').write_text('not an image')
  root = tmp_path / 'UTKFace'
  train = age_datasets.read_utkface(root, 'train', val_fraction=0.25)
  val = age_datasets.read_utkface(root, 'val', val_fraction=0.25)
  assert train.skipped == () and 5 < len(val.examples) < 35
  assert set(train.examples.paths).isdisjoint(val.examples.paths)
  assert len(train.examples) + len(val.examples) == len(names)
  everything = age_datasets.read_utkface(root).examples
  assert everything.paths == tuple(str(root / n) for n in sorted(names))
  np.testing.assert_array_equal(everything.labels['age'],
                                [int(n.split('_')[0]) for n in sorted(names)])
  assert everything.labels['gender'].dtype == np.int32
  assert set(everything.labels['age_group']) == {-1}

  _write_image(root / 'sub' / '39_1_20170116174525125.jpg.chip.jpg')
  with pytest.raises(DataError, match=r'sub/39_1_20170116174525125\.jpg\.chip\.jpg: race field'):
    age_datasets.read_utkface(root, 'train', val_fraction=0.25)
  again = age_datasets.read_utkface(root, 'train', val_fraction=0.25, skip_malformed=True)
  assert again.skipped == ('sub/39_1_20170116174525125.jpg.chip.jpg',)
  assert again.examples.paths == train.examples.paths
  with pytest.raises(DataError, match="split 'test'"):
    age_datasets.read_utkface(root, 'test')


# MORPH II.

@pytest.fixture
def morph(tmp_path):
  """6 images of 3 subjects; the header uses the commercial list's names in odd case."""
  rows = [('003476', 'Album2/003476_00M20.JPG', 20, 'M', 'B'),
          ('003476', 'Album2/003476_01M22.JPG', 22, 'M', 'B'),
          ('101010', 'Album2/101010_00F35.JPG', 35, 'F', 'W'),
          ('101010', 'Album2/101010_01F41.JPG', 41, 'f', 'W'),
          ('222222', 'Album2/222222_00M61.JPG', 61, 'male', 'H'),
          ('222222', 'Album2/222222_01M63.JPG', 63, 'M', 'a')]
  lines = ['ID_num,Photo,Age,Gender,Race,Facial hair']
  for subject, photo, age, gender, race in rows:
    _write_image(tmp_path / photo)
    lines.append(f'{subject},{photo},{age},{gender},{race},0')
  (tmp_path / 'morph_2008_nonCommercial.csv').write_text('\n'.join(lines) + '\n')
  return tmp_path


def test_read_morph(morph):
  everything = age_datasets.read_morph(morph, None)
  assert everything.name == 'morph2' and len(everything) == 6
  assert everything.paths[0] == str(morph / 'Album2' / '003476_00M20.JPG')
  np.testing.assert_array_equal(everything.labels['age'], [20, 22, 35, 41, 61, 63])
  np.testing.assert_array_equal(everything.labels['gender'], [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(everything.labels['race'], [1, 1, 0, 0, 4, 2])
  train = age_datasets.read_morph(morph, 'train', test_fraction=0.5)
  test = age_datasets.read_morph(morph, 'test', test_fraction=0.5)
  assert len(train) == 2 and len(test) == 4  # Subjects hash to 0.95, 0.16 and 0.30.
  subject = lambda path: Path(path).name[:6]
  assert {subject(p) for p in train.paths}.isdisjoint(subject(p) for p in test.paths)
  for fraction, split in ((0.0, 'test'), (1.0, 'train')):
    with pytest.raises(DataError, match='no rows in split'):
      age_datasets.read_morph(morph, split, test_fraction=fraction)


@pytest.mark.parametrize('old, new, match', [
    (',M,B,', ',1,B,', r"line 2: column 'Gender': '1' is not one of"),
    (',F,W,', ',F,X,', r"line 4: column 'Race': 'X'"),
    (',20,', ',abc,', r"line 2: column 'Age': age 'abc'"),
    (',63,', ',170,', r"line 7: column 'Age': age '170'"),
    ('Photo', 'Snapshot', r'no filename column'),
    (',0\n', ',0,extra\n', r'line 2: expected 6 fields, got 7'),
])
def test_read_morph_strict_values(morph, old, new, match):
  path = morph / 'morph_2008_nonCommercial.csv'
  path.write_text(path.read_text().replace(old, new, 1))
  with pytest.raises(DataError, match=rf'morph_2008_nonCommercial\.csv: {match}'):
    age_datasets.read_morph(morph)


def test_read_morph_without_gender_race_columns_and_missing_files(tmp_path):
  _write_image(tmp_path / 'a.png')
  (tmp_path / 'list.csv').write_text('file name,AGE\na.png,30\nb.png,31\n')
  with pytest.raises(DataError, match=r'1 image file\(s\) missing.*b\.png'):
    age_datasets.read_morph(tmp_path, None)
  examples = age_datasets.read_morph(tmp_path, None, check_files=False)
  np.testing.assert_array_equal(examples.labels['gender'], [-1, -1])
  np.testing.assert_array_equal(examples.labels['race'], [-1, -1])
  (tmp_path / 'other.csv').write_text('filename,age\n')
  with pytest.raises(DataError, match='expected one MORPH II list'):
    age_datasets.read_morph(tmp_path)
  assert len(age_datasets.read_morph(tmp_path, None, csv_path='list.csv', check_files=False)) == 2


# Adience.

_ADIENCE_HEADER = ('user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\t'
                   'fiducial_yaw_angle\tfiducial_score')


@pytest.fixture
def adience(tmp_path):
  """Fold k holds 3 rows; fold 0 adds an unknown age and an age matching no group."""
  ages = ['(0, 2)', '(4, 6)', '(8, 12)', '(15, 20)', '(25, 32)', '(38, 42)', '(48, 53)',
          '(60, 100)', '13', '(25, 32)', '(38, 43)', '(0, 2)', '2', '(48, 53)', '(60, 100)']
  genders = ['m', 'f', 'u', '', 'f']
  for fold in range(5):
    lines = [_ADIENCE_HEADER]
    rows = [(f'user{fold}', f'{fold}{i}_ab_o.jpg', 100 * fold + i, ages[3 * fold + i],
             genders[(fold + i) % 5]) for i in range(3)]
    if fold == 0:
      rows += [('user0', 'x.jpg', 7, 'None', 'm'), ('user0', 'y.jpg', 8, '(38, 48)', 'f')]
    for user, image, face, age, gender in rows:
      _write_image(tmp_path / 'faces' / user / f'coarse_tilt_aligned_face.{face}.{image}')
      lines.append(f'{user}\t{image}\t{face}\t{age}\t{gender}\t1\t2\t3\t4\t0\t0\t50')
    (tmp_path / f'fold_{fold}_data.txt').write_text('\n'.join(lines) + '\n')
  return tmp_path


def test_read_adience(adience):
  test, skipped = age_datasets.read_adience(adience, 'test', 'fold0')
  assert test.name == 'adience' and len(test) == 3
  assert test.paths[1] == str(adience / 'faces/user0/coarse_tilt_aligned_face.1.01_ab_o.jpg')
  np.testing.assert_array_equal(test.labels['age_group'], [0, 1, 2])  # (8, 12) is in 8-13.
  np.testing.assert_array_equal(test.labels['age'], [1, 5, 10])
  np.testing.assert_array_equal(test.labels['gender'], [0, 1, -1])
  np.testing.assert_array_equal(test.labels['race'], [-1, -1, -1])
  assert len(skipped) == 2
  assert skipped[0].endswith("fold_0_data.txt: line 5: age 'None'")
  assert skipped[1].endswith("fold_0_data.txt: line 6: age '(38, 48)'")

  train, skipped = age_datasets.read_adience(adience, 'train', 'fold0')
  assert len(train) == 12 and skipped == ()
  np.testing.assert_array_equal(train.labels['age_group'], [3, 4, 5, 6, 7, 2, 4, 5, 0, 0, 6, 7])
  assert set(train.paths).isdisjoint(test.paths)
  fold3 = age_datasets.read_adience(adience, 'test', 'fold3').examples
  assert fold3.paths == train.paths[6:9]
  all_rows = age_datasets.read_adience(adience, None).examples
  assert len(all_rows) == 15


@pytest.mark.parametrize('old, new, match', [
    ('\t(4, 6)\t', '\tfour\t', r"line 3: column age: age 'four'"),
    ('\t(4, 6)\t', '\t(6, 4)\t', r"line 3: column age: age range '\(6, 4\)' is reversed"),
    ('\t(4, 6)\tf\t', '\t(4, 6)\tx\t', r"line 3: column gender: 'x'"),
    ('\t1\t(4, 6)', '\tone\t(4, 6)', r"line 3: column face_id: 'one'"),
    ('user_id', 'userid', r'line 1: no column\(s\) \[.user_id.\]'),
])
def test_read_adience_malformed(adience, old, new, match):
  path = adience / 'fold_0_data.txt'
  path.write_text(path.read_text().replace(old, new, 1))
  with pytest.raises(DataError, match=rf'fold_0_data\.txt: {match}'):
    age_datasets.read_adience(adience, 'test', 'fold0')


def test_read_adience_bad_protocol_and_missing_image(adience):
  with pytest.raises(DataError, match=r"'fold5'.*'fold0'"):
    age_datasets.read_adience(adience, 'test', 'fold5')
  (adience / 'faces/user2/coarse_tilt_aligned_face.201.21_ab_o.jpg').unlink()
  with pytest.raises(DataError, match=r'1 image file\(s\) missing.*201\.21_ab_o\.jpg'):
    age_datasets.read_adience(adience, 'train', 'fold0')
  assert len(age_datasets.read_adience(adience, 'test', 'fold2', check_files=False)[0]) == 3


# Real data (skipped in a fresh clone).

def test_real_utkface_smoke():
  root = shared_dataset('utkface')
  examples = read_folder(root, 'val', label_columns=('age', 'gender', 'race'))
  assert len(examples) > 100
  labels = examples.labels
  assert 0 <= labels['age'].min() and labels['age'].max() <= age_datasets.MAX_AGE
  assert set(np.unique(labels['gender'])) <= {0, 1}
  assert set(np.unique(labels['race'])) <= set(range(5))
  # The folder's file names are UTKFace's own, and agree with its label columns.
  parsed = np.array([age_datasets.parse_utkface_name(p) for p in examples.paths])
  np.testing.assert_array_equal(parsed, np.stack([labels[c] for c in ('age', 'gender', 'race')], 1))


def test_expected_age_gaussian_matches_numpy_including_the_range_ends():
  num_ages = 30
  mean = np.array([0.0, 3.0, 15.0, 29.0], np.float32)
  log_sigma = np.log(np.array([8.0, 1.0, 2.0, 20.0], np.float32))
  edges = np.arange(num_ages + 1) - 0.5
  expected = []
  for m, s in zip(mean, np.exp(log_sigma)):
    mass = np.diff(scipy.stats.norm.cdf(edges, m, s))
    expected.append((mass / mass.sum()) @ np.arange(num_ages))
  got = losses.expected_age_gaussian(jnp.asarray(mean), jnp.asarray(log_sigma), num_ages)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
  assert got[0] > 3  # a wide Gaussian truncated at 0: the expectation, not the raw mean
