"""``--config.seed`` drives every task's randomness: init, data order and augmentation, and
the loop's per-step key (dropout, masking), which is derived from ``train.seed``."""
import jax
import numpy as np
import pytest

from faceflax import config_checks, tasks
from tests import configs_for_tests, predict_helpers

pytestmark = pytest.mark.filterwarnings('ignore:the load_module')  # ml_collections' loader


def _flags(task, tmp_path, transfer_data_root, age_faces):
  """The overrides that give each task's :test preset its data, and its first stage."""
  if task == 'fbp_kd':
    return ['--config.teacher.finetune.from_pretrained=False'], 'teacher_pretrain'
  if task == 'lqfr_kd':
    return [], 'teacher'
  if task == 'age_mtmsa':
    return [f'--config.data.dir={age_faces}'], 'train'
  if task == 'face_prior':
    root = tmp_path / 'prior'
    if not root.exists():
      predict_helpers.folder_dataset(root / 'plain', (), lambda i, t: ())
    return [f'--config.data.root={root}', '--config.data.datasets=plain'], 'pretrain'
  return ([f'--config.data.root={transfer_data_root}', '--config.tasks=age',
           '--config.protocols=finetune'], 'finetune_age')


def _first_stage(task, seed, tmp_path, transfer_data_root, age_faces):
  """``(params, batches)`` of the task's first stage under ``--config.seed``: each call gives
  the initial params and the first two batches afresh."""
  flags, stage_name = _flags(task, tmp_path, transfer_data_root, age_faces)
  config = configs_for_tests.parse_flags(task, f'--config.seed={seed}', *flags)
  assert config.train.seed == seed  # what loop.run seeds init and every step's key with
  workdir = tmp_path / f'work{seed}'
  workdir.mkdir(exist_ok=True)
  stage = tasks.get(task).Job(config, str(workdir)).stage(stage_name)
  init = jax.jit(stage.init_fn)

  def draw():
    batches = stage.batches(start_step=0)
    return init(jax.random.key(config.train.seed))['params'], [next(batches) for _ in range(2)]
  return draw


def _same(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


@pytest.mark.parametrize('task', ['fbp_kd', 'lqfr_kd', 'age_mtmsa', 'face_prior', 'transfer'])
def test_one_seed_drives_init_and_batches(task, tmp_path, transfer_data_root, age_faces):
  draw = {seed: _first_stage(task, seed, tmp_path, transfer_data_root, age_faces)
          for seed in (0, 1)}
  runs = {'a': draw[0](), 'again': draw[0](), 'b': draw[1]()}
  assert _same(runs['a'], runs['again'])  # init and batches: a pure function of the seed
  assert not _same(runs['a'][0], runs['b'][0]), 'initial parameters ignore the seed'
  for step in range(2):
    images = [runs[k][1][step]['image'] for k in ('a', 'b')]
    assert not np.array_equal(*images), f'batch {step} ignores the seed'


def test_a_train_seed_that_differs_from_seed_is_refused():
  """A config file that sets train.seed to a number instead of following config.seed (flags
  cannot split them: either override sets the shared reference)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert configs_for_tests.parse_flags('lqfr_kd', '--config.train.seed=2').seed == 2
  values = configs_for_tests.load('lqfr_kd', 'test').to_dict()
  values['seed'], values['train']['seed'] = 1, 2
  with pytest.raises(ValueError, match='train.seed=2 differs from config.seed=1'):
    config_checks.check_common(ml_collections.ConfigDict(values))
