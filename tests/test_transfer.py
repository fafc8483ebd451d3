"""Transfer benchmark: probes, few-shot sampler, backbone loading, the whole job on tiny data."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from faceflax import app, backbones, probes
from faceflax.data import synthetic
from faceflax.models import mae
from faceflax.tasks import transfer
from faceflax.train import checkpoint, mesh as mesh_lib
from tests import configs_for_tests
from tests.conftest import REPO, copy_workdir, shared_dataset

NUM_TRAIN, NUM_VAL = 32, 16
ATTRIBUTES = ('Smiling', 'Big_Eyes', 'Pale_Skin')


def _write_dataset(root, header, label_fn, images, traits):
  (root / 'images').mkdir(parents=True)
  rows = []
  for i, image in enumerate(images):
    Image.fromarray(image).save(root / 'images' / f'{i:03d}.png')
    t = {k: v[i] for k, v in traits.items()}
    rows.append((f'{i:03d}.png', *label_fn(i, t), 'train' if i < NUM_TRAIN else 'val'))
  with open(root / 'labels.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('filename', *header, 'split'), *rows])


def write_data_root(root):
  """The four downstream datasets in miniature, under their ../shared/data names."""
  images, traits = synthetic.make_faces(NUM_TRAIN + NUM_VAL, size=32, seed=0)
  pm = lambda x: 1 if x > 0 else -1
  _write_dataset(root / 'fer2013', ('label',), lambda i, t: (i % 7,), images, traits)
  _write_dataset(root / 'celeba_id', ('identity', 'id_noisy', *ATTRIBUTES),
                 lambda i, t: (i // 4, 0, pm(t['smile']), pm(t['eye_size']), pm(t['skin_tone'])),
                 images, traits)
  _write_dataset(root / 'utkface', ('age', 'gender'),
                 lambda i, t: (int(40 + 15 * t['eye_height']), i % 2), images, traits)
  _write_dataset(root / 'scut_fbp5500', ('score',), lambda i, t: (f'{t["score"]:.3f}',),
                 images, traits)
  return root


@pytest.fixture
def data_root(transfer_data_root):
  """write_data_root's datasets, made once per session (conftest.py)."""
  return transfer_data_root


def _config(data_root, **overrides):
  config = configs_for_tests.load('transfer', 'test')
  config.data.root = str(data_root)
  config.update(overrides)
  return config


def job_config(data_root, fbp_workdir):
  """The session's transfer job (conftest.transfer_job): every task and protocol, the
  fbp_kd :test job's MAE-pretrained teacher as the backbone."""
  config = _config(data_root)
  config.backbone.update(workdir=str(fbp_workdir), stage='teacher_pretrain')
  config.backbone.model.update(stem='multiscale', stem_channels=24, stem_stride=2)  # its model
  return config


# ----------------------------------------------------------------------------- probes

def test_fewshot_draws_only_train_faces(data_root):
  config = _config(data_root)
  for task in ('expression', 'attributes'):
    data = transfer.load_task(config, task)
    rows = probes.fewshot_indices(data.y_train, 0, data.spec.kind, 3, 0.25)
    picked = {data.train.paths[i] for i in rows}
    assert picked and not picked & set(data.val.paths)
  assert data.columns == ATTRIBUTES  # identity, id_noisy and split are not attributes
  assert data.y_train.shape == (NUM_TRAIN, 3) and set(np.unique(data.y_train)) == {0.0, 1.0}


# ----------------------------------------------------------------------------- backbone

def _save_state(directory, params):
  state = {'params': params, 'opt_state': {'mu': jax.tree.map(jnp.zeros_like, params)},
           'step': jnp.array(3, jnp.int32)}
  mngr = checkpoint.manager(str(directory), save_every=1, keep=1)
  mngr.save(3, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()
  mngr.close()


@pytest.mark.parametrize('layout', ['mae', 'student', 'plain'])
def test_backbone_params_are_found_in_each_layout(tmp_path, layout):
  config = configs_for_tests.load('transfer', 'test')
  model = mae.from_config(config.backbone.model, config.backbone.image_size)
  saved = mae.init_params(model, jax.random.key(7), config.backbone.image_size)
  wrapped = {'mae': {'mae': saved, 'prior': {'w': jnp.ones(3)}},
             'student': {'student': saved, 'projector': {'w': jnp.ones(2)}},
             'plain': saved}[layout]
  _save_state(tmp_path / 'pretrain' / 'ckpt', wrapped)
  config.backbone.workdir = str(tmp_path)
  _, params, report = backbones.load_backbone(config, mesh_lib.make_mesh())
  assert report['layout'] == layout and report['step'] == 3
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(got, want)


def test_mismatched_backbone_model_is_an_error(tmp_path):
  config = configs_for_tests.load('transfer', 'test')
  other = mae.from_config(config.backbone.model, 32).clone(width=16)
  _save_state(tmp_path / 'pretrain' / 'ckpt',
              mae.init_params(other, jax.random.key(0), 32))
  config.backbone.workdir = str(tmp_path)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"(?s)'plain' params.*embed/.*kernel: model \(8, 8, 3, 32\), "
                           r"pretrained \(8, 8, 3, 16\).*encoder/block0"):
    backbones.load_backbone(config, mesh_lib.make_mesh())
  config.backbone.stage = 'nowhere'
  with pytest.raises(checkpoint.CheckpointError, match='nowhere'):
    backbones.load_backbone(config, mesh_lib.make_mesh())


@pytest.mark.filterwarnings('ignore:the load_module')  # ml_collections' config loader
def test_docstring_overrides_build_the_fbp_teacher():
  argv = ['main.py', f'--config={REPO}/configs/transfer.py', '--config.backbone.workdir=/w',
          '--config.backbone.stage=teacher_pretrain', '--config.backbone.model.variant=small',
          '--config.backbone.model.stem=multiscale', '--config.backbone.model.patch=16',
          '--config.backbone.model.stem_stride=4', '--config.data.dirs.age=/elsewhere/utk']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  teacher = mae.from_config(configs_for_tests.load('fbp_kd', 'scut').teacher.model, 64)
  model = mae.from_config(config.backbone.model, config.backbone.image_size)
  for field in ('width', 'depth', 'num_heads', 'stem', 'patch', 'stem_channels', 'stem_kernels',
                'stem_stride', 'image_size'):
    assert getattr(model, field) == getattr(teacher, field), field
  assert transfer.task_dir(config, 'age') == '/elsewhere/utk'
  assert transfer.task_dir(config, 'beauty') == '../shared/data/scut_fbp5500'
  config = configs_for_tests.load('transfer', 'test')
  config.tasks = 'age,gaze'
  with pytest.raises(ValueError, match=r"tasks='age,gaze': unknown or no names \['gaze'\]"):
    transfer.check_config(config)


# ----------------------------------------------------------------------------- the job

def test_end_to_end_then_eval_mode(data_root, fbp_job, transfer_job, tmp_path):
  config = job_config(data_root, fbp_job[0])
  trained, results = transfer_job  # app.run(config, workdir), once per session
  copy_workdir(trained, tmp_path)
  saved = json.loads((tmp_path / 'results.json').read_text())
  for task, spec in transfer.TASKS.items():
    for protocol in ('train_prior', *transfer.PROTOCOLS):
      entry = saved[task][protocol]
      assert np.isfinite(entry[spec.metric]), (task, protocol)
      assert entry['n_val'] == NUM_VAL
    assert saved[task]['linear']['n_train'] == saved[task]['finetune']['n_train'] == NUM_TRAIN
    assert len(saved[task]['fewshot'][f'{spec.metric}_per_seed']) == 2
    assert (tmp_path / f'finetune_{task}' / 'done.json').exists()
  assert saved['expression']['fewshot']['n_train'] == 14  # 2 per class, 7 classes
  assert saved['age']['fewshot']['n_train'] == 8          # 25% of 32
  assert 0 <= saved['attributes']['linear']['mean_accuracy'] <= 1
  assert {'pc', 'mae', 'rmse'} <= set(saved['beauty']['linear'])
  backbone = saved['backbone']
  assert (backbone['stage'], backbone['layout'], backbone['feature_dim']) == (
      'teacher_pretrain', 'plain', 32)  # the fbp_kd teacher's MAE, width 32
  pretrained = json.loads((fbp_job[0] / 'teacher_pretrain' / 'done.json').read_text())
  assert backbone['step'] == pretrained['steps']  # its last checkpoint
  assert saved['seconds']['age/finetune'] > 0
  assert '| expression | accuracy (higher is better) |' in (tmp_path / 'results.md').read_text()
  assert results['beauty']['finetune'] == saved['beauty']['finetune']
  # --mode=eval re-runs the probes and scores the finished stages without training.
  again = app.run(config, str(tmp_path), mode='eval')
  assert json.loads((tmp_path / 'eval.json').read_text())['age'] == again['age']
  for task in transfer.TASKS:
    for protocol in ('linear', 'finetune'):
      for k, v in saved[task][protocol].items():
        np.testing.assert_allclose(again[task][protocol][k], v, rtol=1e-4, atol=1e-6)
  # Another backbone (here: the same teacher after fine-tuning) must not reuse these
  # fine-tuned stages.
  config.backbone.stage = 'teacher_finetune'
  with pytest.raises(ValueError, match="backbone.stage: 'teacher_pretrain' -> 'teacher_finetune'"):
    app.run(config, str(tmp_path))  # the recorded config (W/config.json) refuses it first
  (tmp_path / 'config.json').unlink()  # a workdir from before configs were recorded:
  with pytest.raises(ValueError, match='another backbone'):  # backbone.json refuses it
    app.run(config, str(tmp_path))


def test_unfinished_finetuning_is_not_scored_in_eval_mode(data_root, tmp_path):
  config = _config(data_root, tasks='beauty', protocols='finetune')
  results = app.run(config, str(tmp_path), mode='eval')
  assert set(results['beauty']) == {'train_prior'}
  assert not (tmp_path / 'finetune_beauty').exists()


# ----------------------------------------------------------------------------- real data

def test_real_tasks_read_from_shared_data():
  config = configs_for_tests.load('transfer')
  shared_dataset('celeba_id')
  config.data.root = str(REPO / config.data.root)
  attributes = transfer.load_task(config, 'attributes')
  assert len(attributes.columns) == 40 and 'Smiling' in attributes.columns
  assert attributes.y_train.shape == (len(attributes.train), 40)
  assert not set(attributes.train.labels['identity']) & set(attributes.val.labels['identity'])
  for task in ('expression', 'age', 'beauty'):
    shared_dataset(transfer.TASKS[task].data)
    data = transfer.load_task(config, task)
    assert len(data.train) > len(data.val) > 100
  assert set(np.unique(transfer.load_task(config, 'expression').y_val)) == set(range(7))
