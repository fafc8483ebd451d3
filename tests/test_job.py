"""The shared run skeleton (faceflax/train/job.py): a new method is one task file and one
config file (README "Adding a method"), and the skeleton's modes work for it unchanged."""
import json
import sys
import textwrap

import numpy as np
import pytest
from ml_collections import config_flags
from absl import flags

from faceflax import app, tasks

# Written from the README walkthrough alone: a plain supervised baseline for any folder-format
# label (here the expression class of the transfer tests' fer2013 miniature).
TASK = '''
import flax.linen as nn
import jax.numpy as jnp

from faceflax import downstream
from faceflax.data import pipeline
from faceflax.models import resnet_msa
from faceflax.train import evaluation, job as job_lib, loop, optim, state as state_lib


class Classifier(nn.Module):
  trunk: nn.Module
  out_dim: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.out_dim)(self.trunk(x, train=train)['pooled'])


def spec(config) -> downstream.TaskSpec:
  d = config.data
  return downstream.TaskSpec(d.dir, (d.column,), d.kind, d.metric, True, d.num_classes)


class Job(job_lib.Job):
  STAGES = ('train',)

  def __init__(self, config, workdir, restore_only=False):
    super().__init__(config, workdir, restore_only)
    trunk = resnet_msa.make(config.model.variant, heads=(), msa_stages=())
    self.model = Classifier(trunk, config.data.num_classes)

  def data(self):
    d = self.config.data
    return downstream.load('label', spec(self.config), d.dir, 'train', d.eval_split)

  def build(self, name, upstream):
    cfg, size, model = self.config.train, self.config.data.image_size, self.model
    tx, sched = optim.adamw(cfg, cfg.steps)

    def init_fn(rng):
      v = model.init(rng, jnp.zeros((1, size, size, 3)))
      return state_lib.init_state(v['params'], tx, v['batch_stats'])

    def loss_fn(params, batch, rng, model_state):  # model_state: the BatchNorm statistics
      out, new = model.apply({"params": params, "batch_stats": model_state}, batch["image"],
                             train=True, mutable=['batch_stats'])
      loss = downstream.task_loss('classification', 'mse', out, batch['target'])
      return loss, ({}, new['batch_stats'])

    return loop.train_stage('train', cfg, (tx, sched), init_fn, loss_fn, size, {'target': ()})

  def batches(self, name):
    c, data = self.config, self.data()
    return pipeline.train_batches(c, data.train.images, {'target': data.y_train},
                                  batch_size=c.train.batch_size, pp=c.data.train_pp, seed=c.seed)

  def evaluate(self, split, prefix):
    c, data, state = self.config, self.data(), self.state('train')
    variables = {'params': state['params'], 'batch_stats': state['model_state']}
    forward = job_lib.replicated_jit(lambda v, x: self.model.apply(v, x), self.mesh)
    outputs = evaluation.predict_images(forward, variables, data.val.images, c, self.mesh)
    pred = downstream.decode(data.spec.kind, outputs)
    return {'val': downstream.score(data.spec, pred, data.y_val)}
'''

CONFIG = '''
import ml_collections


def get_config(preset=''):
  c = ml_collections.ConfigDict()
  c.task = 'my_methods.supervised'
  c.seed = 0
  c.stages = 'train,evaluate'
  c.reuse_from = ''
  c.eval_batch_size = 16
  c.data = dict(dir='', column='label', kind='classification', metric='accuracy',
                num_classes=7, image_size=32, eval_split='val',
                train_pp='flip_lr|value_range(-1, 1)', eval_pp='value_range(-1, 1)')
  c.model = dict(variant='test')
  c.train = dict(steps=4, batch_size=16, lr=1e-3, warmup_steps=1, weight_decay=0.0,
                 log_every=2, checkpoint_every=2, keep_checkpoints=1)
  c.train.seed = c.get_ref('seed')
  c.eval = dict(split='val')
  c.mesh = dict(data=-1, model=1)
  return c
'''


@pytest.fixture
def method(tmp_path, monkeypatch):
  """The baseline as a project outside faceflax: a package with the task and a config."""
  package = tmp_path / 'project' / 'my_methods'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('')
  (package / 'supervised.py').write_text(textwrap.dedent(TASK))
  config_file = tmp_path / 'project' / 'supervised_config.py'
  config_file.write_text(textwrap.dedent(CONFIG))
  monkeypatch.syspath_prepend(str(tmp_path / 'project'))
  yield config_file
  sys.modules.pop('my_methods.supervised', None)
  sys.modules.pop('my_methods', None)


def _load(config_file, data_dir):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', str(config_file), flag_values=values)
  values(['prog'])
  config = values.config
  config.data.dir = str(data_dir)
  return config


def test_a_new_method_is_one_task_file_and_one_config(method, transfer_data_root, tmp_path):
  config = _load(method, transfer_data_root / 'fer2013')
  workdir = tmp_path / 'run'
  results = app.run(config, str(workdir), mode='train')
  saved = json.loads((workdir / 'results.json').read_text())
  assert 0 <= saved['val']['accuracy'] <= 1
  assert set(saved['stage_seconds']) == {'train'} and saved['wall_seconds_this_run'] > 0
  assert results['val'] == saved['val']
  assert json.loads((workdir / 'config.json').read_text())['task'] == 'my_methods.supervised'
  # --mode=eval restores the trained model (never trains) and scores it the same way.
  again = app.run(config, str(workdir), mode='eval')
  assert again['val'] == saved['val']
  assert again['restored']['train']['step'] == config.train.steps
  assert (workdir / 'eval_fer2013.json').exists()
  # The rerun of a finished workdir trains nothing and gives the same results.
  rerun = app.run(config, str(workdir), mode='train')
  np.testing.assert_equal(rerun['val'], saved['val'])


def test_task_names_are_the_modules_of_the_package():
  assert {'fbp_kd', 'lqfr_kd', 'age_mtmsa', 'face_prior', 'transfer'} <= set(tasks.names())
  with pytest.raises(ValueError, match='unknown task'):
    tasks.get('no_such_task')
  with pytest.raises(ValueError, match='no such module'):
    tasks.get('no_such_package.task')
