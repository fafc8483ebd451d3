"""Bad inputs (issue 7): each case gives an error naming the culprit, or a documented skip,
and leaves the previous checkpoint and the workdir's results as they were.

Sections follow README "Failure behaviour": data, configs, checkpoints, diverging runs,
untrusted files, unwritable workdir / full disk. Fixtures are tiny generated images and
a 512-parameter linear model, so the whole file runs in well under a minute.
"""
import ast
import errno
import json
import os
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from clu import metric_writers
from PIL import Image

from faceflax import app, config_checks, downstream
from faceflax.data import DataError, bad_data, get_preprocess_fn, pairs, read_folder, sources
from faceflax.data.folder import load_array
from faceflax.tasks import age_mtmsa, transfer
from faceflax.train import checkpoint, files, loop, mesh as mesh_lib, stages, state as state_lib
from tests import configs_for_tests
from tests.conftest import REPO


# ----------------------------------------------------------------------------- fixtures

def _image(path, seed, mode='RGB', size=32, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
  Image.fromarray(pixels).convert(mode).save(path, format=fmt)


def _dataset(root, n=24, val=8, header='filename,score,split'):
  """n RGB faces-to-be (random pixels) with scores in 1..5; the last `val` rows are 'val'."""
  lines = [header]
  for i in range(n):
    _image(root / 'images' / f'f{i}.jpg', i)
    lines.append(f'f{i}.jpg,{1 + (i % 9) / 2},{"val" if i >= n - val else "train"}')
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return root


def _set_line(root, line, text):
  """Replaces labels.csv line `line` (1-based, the header is line 1)."""
  lines = (root / 'labels.csv').read_text().splitlines()
  lines[line - 1] = text
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')


@pytest.fixture
def folder(tmp_path):
  return _dataset(tmp_path / 'faces')


def _tree_bytes(path):
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


# ----------------------------------------------------------------------------- data

def test_corrupt_and_truncated_images_are_named_before_training(folder):
  (folder / 'images' / 'f3.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  data = (folder / 'images' / 'f5.jpg').read_bytes()
  (folder / 'images' / 'f5.jpg').write_bytes(data[:len(data) * 9 // 10])  # truncated mid-scan
  with pytest.raises(DataError, match=r'labels\.csv: 2 unreadable image\(s\): .*f3\.jpg: not an '
                                      r'image: .*f5\.jpg: does not decode'):
    read_folder(folder, 'train', label_columns=('score',))


def test_missing_image_file_is_named(folder):
  (folder / 'images' / 'f7.jpg').unlink()
  with pytest.raises(DataError, match=r'1 image file\(s\) missing: .*images/f7\.jpg'):
    read_folder(folder, 'train')


@pytest.mark.parametrize('value, why', [
    ('abc', "column 'score' needs a finite number, got 'abc'"),
    ('nan', "column 'score' needs a finite number, got 'nan'"),
    ('', "column 'score' needs a finite number, got ''"),
])
def test_unreadable_label_names_line_and_column(folder, value, why):
  _set_line(folder, 5, f'f3.jpg,{value},train')
  with pytest.raises(DataError, match=rf"labels\.csv: 1 bad label value\(s\): line 5: {why}"):
    read_folder(folder, 'train', label_columns=('score',))


def test_out_of_range_score_and_age_and_unknown_class_are_named(folder, tmp_path):
  _set_line(folder, 3, 'f1.jpg,7.5,train')
  with pytest.raises(DataError, match=r'1 score\(s\) outside 1\.\.5: .*f1\.jpg: score 7\.5'):
    sources.load_examples(folder, 'train', label_columns=('score',))

  ages = _dataset(tmp_path / 'ages', n=4, val=0)
  (ages / 'labels.csv').write_text('filename,age,gender\nf0.jpg,200,0\nf1.jpg,30,7\n'
                                   'f2.jpg,40,1\nf3.jpg,50,\n')
  config = configs_for_tests.load('age_mtmsa', 'test')
  config.data.dir = str(ages)
  with pytest.raises(DataError, match=r"1 bad gender code\(s\): .*f1\.jpg: column 'gender' must "
                                      r"hold integer codes 0\.\.1 .*got 7"):
    age_mtmsa.load_examples(config, None)
  _set_line(ages, 3, 'f1.jpg,30,1')
  with pytest.raises(DataError, match=r'1 age\(s\) outside 0\.\.116 \(model\.max_age\): .*f0\.jpg: age 200'):
    age_mtmsa.load_examples(config, None)

  expressions = _dataset(tmp_path / 'fer', n=4, val=0)
  (expressions / 'labels.csv').write_text('filename,label\nf0.jpg,0\nf1.jpg,6\nf2.jpg,9\nf3.jpg,1\n')
  spec = transfer.TASKS['expression']
  with pytest.raises(DataError, match=r"1 unknown class\(es\), not in 0\.\.6: .*f2\.jpg: column 'label': 9"):
    downstream.known_classes(spec, read_folder(expressions, label_columns=('label',)), 'fer')


def test_empty_split_and_missing_column_are_named(folder):
  with pytest.raises(DataError, match=r"no rows with split 'test'; available splits: \['train', 'val'\]"):
    read_folder(folder, 'test')
  with pytest.raises(DataError, match=r"labels\.csv: no column 'age' \(columns: \['filename', 'score', 'split'\]\)"):
    read_folder(folder, label_columns=('age',))


@pytest.mark.parametrize('content, message', [
    (b'filename,score,split\n', r'labels\.csv: no rows'),
    (b'name,score\nf0.jpg,1\n', r'labels\.csv: no "filename" column'),
    (b'filename,score\nf0.jpg,1\n\xff\xfe,2\n', r'labels\.csv: line 3, byte 1 of the line: not UTF-8'),
    # far past the first buffer of a text stream: still the line the byte is on
    (b'filename,score\n' + b'f0.jpg,1\n' * 3000 + b'f1.jpg,caf\xe9\n',
     r'labels\.csv: line 3002, byte 11 of the line: not UTF-8'),
    (b'filename,score,score\nf0.jpg,1,2\n', r"labels\.csv: line 1: duplicated column\(s\) \['score'\]"),
    (b'filename,score\nf0.jpg,1\nf1.jpg\n', r'labels\.csv: line 3: expected 2 fields'),
])
def test_malformed_labels_csv_is_named(folder, content, message):
  (folder / 'labels.csv').write_bytes(content)
  with pytest.raises(DataError, match=message):
    read_folder(folder)


def test_grey_image_among_colour_ones_is_named_but_an_all_grey_dataset_is_fine(folder, tmp_path):
  _image(folder / 'images' / 'f2.jpg', 2, mode='L')
  with pytest.raises(DataError, match=r'1 greyscale image\(s\) among colour images: .*f2\.jpg'):
    read_folder(folder, 'train')
  grey = tmp_path / 'grey'
  for i in range(3):
    _image(grey / 'images' / f'g{i}.png', i, mode='L', fmt='PNG')
  (grey / 'labels.csv').write_text('filename,label\ng0.png,0\ng1.png,1\ng2.png,2\n')
  assert len(read_folder(grey, label_columns=('label',))) == 3  # FER2013-like: replicated to RGB


@pytest.mark.parametrize('name', ['../escape.jpg', '/etc/passwd', 'a/../../b.jpg', 'nul\x00.jpg'])
def test_filenames_escaping_the_image_folder_are_refused(folder, name):
  (folder.parent / 'escape.jpg').write_bytes((folder / 'images' / 'f0.jpg').read_bytes())
  _set_line(folder, 4, f'{name},3,train')
  with pytest.raises(DataError, match=r'line 4: filename .* must be a relative path inside the image folder'):
    read_folder(folder, 'train')
  with bad_data.policy(skip=True):  # a crafted path is never merely skipped
    with pytest.raises(DataError, match='must be a relative path'):
      read_folder(folder, 'train')


def test_a_link_out_of_the_dataset_folder_is_refused_unless_allowed(folder, monkeypatch):
  outside = folder.parent / 'elsewhere'
  outside.mkdir()
  (outside / 'x.jpg').write_bytes((folder / 'images' / 'f0.jpg').read_bytes())
  (folder / 'images' / 'f1.jpg').unlink()
  (folder / 'images' / 'f1.jpg').symlink_to(outside / 'x.jpg')
  (folder / 'images' / 'linked').symlink_to(outside)  # a folder on the way counts too
  _set_line(folder, 4, 'linked/x.jpg,3,train')
  with pytest.raises(DataError, match=r"line 3: 'f1.jpg' is a link to .*elsewhere/x.jpg, "
                                      r'outside the dataset folder'):
    read_folder(folder, 'train')
  _set_line(folder, 3, 'f2.jpg,3,val')  # f1 gone: the folder link is next
  with pytest.raises(DataError, match=r"line 4: 'linked/x.jpg' is a link"):
    read_folder(folder, 'train')
  monkeypatch.setenv('FACEFLAX_ALLOW_LINKS_OUT', '1')
  assert len(read_folder(folder, 'train')) == 15
  (folder / 'images' / 'inside.jpg').symlink_to(folder / 'images' / 'f0.jpg')
  monkeypatch.delenv('FACEFLAX_ALLOW_LINKS_OUT')
  _set_line(folder, 4, 'inside.jpg,3,train')  # a link inside the folder is fine
  assert len(read_folder(folder, 'train')) == 15


def test_repeated_files_and_leakage_are_warned_and_counted_in_results(folder, tmp_path):
  _set_line(folder, 3, 'f0.jpg,1.0,train')  # f0 twice in train, same labels as line 2
  _set_line(folder, 4, 'f0.jpg,4,train')   # and once more with another score
  _set_line(folder, 25, 'f5.jpg,3,val')    # f5 is in train (line 7) and in val: leakage
  with bad_data.policy(skip=False):
    read_folder(folder, 'train')
    read_folder(folder, 'train')  # read again: counted once
    stages.write_results(str(tmp_path / 'results.json'), {'x': 1})
  warnings = {w['kind']: w for w in json.loads((tmp_path / 'results.json').read_text())['data_warnings']}
  assert warnings['files listed more than once']['count'] == 2
  assert warnings['files listed more than once with different labels']['example'] == (
      'f0.jpg (lines 2 and 4)')
  leak = warnings["files of split 'train' also listed in another split (leakage between "
                  'training and evaluation)']
  assert leak['count'] == 1 and leak['example'] == "f5.jpg (line 25, split 'val')"
  no_split = folder.parent / 'nosplit'
  _dataset(no_split, header='filename,score')
  lines = (no_split / 'labels.csv').read_text().splitlines()
  (no_split / 'labels.csv').write_text(
      '\n'.join(lines[:1] + [l.rsplit(',', 1)[0] for l in lines[1:]]) + '\n')
  with bad_data.policy(skip=False):
    read_folder(no_split, 'val')
    kinds = [w['kind'] for w in bad_data.summary()['data_warnings']]
  assert any('no "split" column' in k for k in kinds)


def test_skip_bad_leaves_out_and_counts_every_kind_of_bad_row(folder):
  (folder / 'images' / 'f1.jpg').unlink()
  (folder / 'images' / 'f2.jpg').write_bytes(b'garbage')
  _image(folder / 'images' / 'f3.jpg', 3, mode='L')
  _set_line(folder, 6, 'f4.jpg,NaN,train')
  with bad_data.policy(skip=True):
    examples = read_folder(folder, 'train', label_columns=('score',))
    twice = read_folder(folder, 'train', label_columns=('score',))  # counted once
    summary = bad_data.summary()
  assert [os.path.basename(p) for p in examples.paths] == [f'f{i}.jpg' for i in (0, *range(5, 16))]
  assert list(examples.rows) == [0, *range(5, 16)] and len(twice) == len(examples)
  assert summary['data_skipped']['count'] == 4
  reasons = ' '.join(summary['data_skipped']['examples'])
  for what in ('line 6', 'f1.jpg', 'f2.jpg', 'f3.jpg', 'missing', 'unreadable', 'greyscale'):
    assert what in reasons
  assert bad_data.summary() == {}  # outside the policy: strict again, nothing recorded
  with bad_data.policy(skip=True):
    for i in range(24):
      (folder / 'images' / f'f{i}.jpg').write_bytes(b'')
    with pytest.raises(DataError, match='every example is bad'):
      read_folder(folder, 'train')


@pytest.mark.parametrize('name', ['fbp_kd', 'face_prior'])
def test_a_bad_image_in_the_eval_split_fails_before_any_training(folder, tmp_path, name):
  (folder / 'images' / 'f20.jpg').write_bytes(b'\xff\xd8\xff\xdb truncated')  # a 'val' row
  config = configs_for_tests.load(name, 'test')
  if name == 'fbp_kd':
    config.data.dir = str(folder)
  else:
    config.data.update(root=str(folder.parent), datasets='faces')
  workdir = tmp_path / 'w'
  with pytest.raises(DataError, match=r'1 unreadable image\(s\): .*f20\.jpg'):
    app.run(config, str(workdir))
  assert os.listdir(workdir) == []  # no stage started


def _transfer_config(root, **overrides):
  config = configs_for_tests.load('transfer', 'test')
  config.update(tasks='beauty', protocols='linear')
  config.data.update(root=str(root), dirs={'beauty': 'faces'}, **overrides)
  return config


def test_skip_bad_counts_in_results_json_and_strict_run_leaves_results_intact(folder, tmp_path):
  (folder / 'images' / 'f4.jpg').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'results.json').write_text('{"earlier": 1}')
  with pytest.raises(DataError, match=r'1 unreadable image\(s\): .*f4\.jpg'):
    app.run(_transfer_config(folder.parent), str(workdir))
  assert json.loads((workdir / 'results.json').read_text()) == {'earlier': 1}

  results = app.run(_transfer_config(folder.parent, skip_bad=True), str(workdir))
  written = json.loads((workdir / 'results.json').read_text())
  assert written['data_skipped']['count'] == 1 and 'f4.jpg' in written['data_skipped']['examples'][0]
  assert written['beauty']['linear']['n_train'] == 15 == results['beauty']['linear']['n_train']


def test_a_workdir_rerun_with_another_config_is_refused_unless_asked(folder, tmp_path):
  """A workdir trained with one config is not retrained or re-scored under another: the
  keys that differ are listed and nothing is written; neutral keys (logging, mesh, batch
  size of evaluation) may change; --allow_config_change keeps the earlier results aside."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  stages.record_config(_transfer_config(folder.parent), str(workdir))
  (workdir / 'results.json').write_text('{"earlier": 1}')
  changed = _transfer_config(folder.parent, max_train=5)
  changed.seed = 1
  with pytest.raises(stages.ConfigChanged,
                     match=r"3 key\(s\) differ: data.max_train: 0 -> 5; seed: 0 -> 1; "
                           r"train.seed: 0 -> 1\. .*--allow_config_change"):
    app.run(changed, str(workdir))
  assert json.loads((workdir / 'results.json').read_text()) == {'earlier': 1}
  neutral = _transfer_config(folder.parent)
  neutral.train.log_every, neutral.eval_batch_size, neutral.stages = 1, 8, 'x'
  stages.check_config_unchanged(neutral, str(workdir))
  stages.check_config_unchanged(changed, str(workdir), allow_change=True)
  kept = list(workdir.glob('results.before-*.json'))
  assert len(kept) == 1 and json.loads(kept[0].read_text()) == {'earlier': 1}


def test_keys_added_since_a_workdir_trained_count_as_their_old_behaviour():
  """A config.json from before a key existed (stages.ADDED_KEYS) matches a config with the
  key at the value that reproduces the old training; any other value is a change."""
  config = configs_for_tests.load('fbp_kd', 'test')
  recorded = stages._flat_config(config)  # pylint: disable=protected-access
  for key in ('teacher.model.remat', 'student.kd.mixup', 'student.kd.ema_decay'):
    del recorded[key]
  assert stages.config_changes(recorded, config) == []
  config.student.kd.ema_decay = 0.99
  assert stages.config_changes(recorded, config) == ['student.kd.ema_decay: 0.0 -> 0.99']
  config = configs_for_tests.load('lqfr_kd', 'test')
  recorded = stages._flat_config(config)  # pylint: disable=protected-access
  del recorded['student.kd.relational']
  assert stages.config_changes(recorded, config) == []


# ----------------------------------------------------------------------------- configs

def _parse_flags(*overrides):
  return configs_for_tests.parse_flags('fbp_kd', *overrides)


def test_a_key_of_another_tasks_config_is_named_in_one_line(tmp_path):
  """--config.<key> that the task's config lacks: the flag, the unknown part and the
  closest valid keys, in one line and exit status 2, not the config library's traceback."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  spec = f'{REPO}/configs/age_mtmsa.py:test'
  message = config_checks.unknown_override(spec, ['--workdir=w', '--config.teacher.model.variant=x'])
  assert message.startswith("--config.teacher.model.variant=x: ") and (
      "'teacher' is not a key of the top level; task 'age_mtmsa'" in message)
  assert 'model.variant' in message.split('Closest valid keys: ')[1]
  assert "'varient' is not a key of model" in config_checks.unknown_override(
      spec, ['--config.model.varient=x'])
  assert config_checks.unknown_override(spec, ['--config.model.variant=x']) == ''
  done = subprocess.run([sys.executable, 'main.py', f'--config={spec}', f'--workdir={tmp_path}',
                         '--config.teacher.model.variant=x'], cwd=REPO, capture_output=True,
                        text=True, check=False)
  assert done.returncode == 2 and 'Traceback' not in done.stderr
  assert "FATAL config: --config.teacher.model.variant=x:" in done.stderr
  assert not list(tmp_path.iterdir())


def test_expected_errors_exit_1_in_one_line_and_bugs_keep_their_traceback(tmp_path):
  """A DataError (here: a data folder without images/) is one line and exit status 1; -v 1
  adds the traceback; an error the user's input did not cause keeps its traceback."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / 'data').mkdir()
  command = [sys.executable, 'main.py', f'--config={REPO}/configs/age_mtmsa.py:test',
             f'--workdir={tmp_path / "w"}', f'--config.data.dir={tmp_path / "data"}']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 1 and 'Traceback' not in done.stderr
  assert f'DataError: no such directory: {tmp_path / "data" / "images"}' in done.stderr
  verbose = subprocess.run(command + ['-v', '1'], cwd=REPO, capture_output=True, text=True,
                           check=False)
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr
  assert app.expected_errors() and not issubclass(KeyError, app.expected_errors())


def test_unknown_keys_and_wrong_types_are_refused_naming_the_key():
  with pytest.raises(Exception, match='alhpa'):
    _parse_flags('--config.student.kd.alhpa=1')
  with pytest.raises(Exception, match='image_size'):
    _parse_flags('--config.data.image_size=big')
  config = _parse_flags()
  with pytest.raises(TypeError, match="'batch_size'"):
    config.teacher.finetune.batch_size = 'sixteen'
  with pytest.raises(AttributeError, match='imagesize'):
    config.data.imagesize = 32


@pytest.mark.parametrize('name, change, message', [
    ('fbp_kd', lambda c: c.data.update(image_size=36),
     r'teacher\.model: image size 36 is not divisible by patch 8'),
    ('fbp_kd', lambda c: c.student.model.update(width=64),
     r'student\.model \(width 64, depth 2\) must be no wider and no deeper than teacher\.model'),
    ('fbp_kd', lambda c: c.student.kd.update(feature_pairs='5:-1'),
     r"feature_pairs='5:-1': '5:-1' is not student_block:teacher_block"),
    ('fbp_kd', lambda c: c.student.kd.update(output_kd='mse'), r"student\.kd\.output_kd='mse'"),
    ('fbp_kd', lambda c: c.teacher.finetune.update(batch_size=0),
     r'teacher\.finetune\.batch_size=0 \(must be an integer >= 1\)'),
    ('fbp_kd', lambda c: c.student.kd.update(lr=-1e-3),
     r'student\.kd\.lr=-0\.001 \(must be a finite number > 0\)'),
    ('fbp_kd', lambda c: c.train.update(on_nonfinite='ignore'), r"train\.on_nonfinite='ignore'"),
    ('lqfr_kd', lambda c: c.student.model.update(variant='small'),
     r'student\.model \(blocks \(2, 2, 2, 2\)\) must be no deeper than teacher\.model'),
    ('face_prior', lambda c: c.model.update(patch=5), r'model: image size 32 is not divisible by patch 5'),
    ('transfer', lambda c: c.backbone.update(image_size=20),
     r'backbone\.model: image size 20 is not divisible by patch 8'),
    ('age_mtmsa', lambda c: c.loss.update(age='mse'), r"loss\.age='mse'"),
])
def test_inconsistent_configs_fail_before_anything_runs(tmp_path, name, change, message):
  config = configs_for_tests.load(name, 'test')
  change(config)
  workdir = tmp_path / 'never_created'
  with pytest.raises(ValueError, match=message):
    app.run(config, str(workdir))
  assert not workdir.exists()  # refused before the workdir, any data or any compilation


# ----------------------------------------------------------------------------- a tiny stage

WIDTH = 512  # > Orbax's 1 KiB inline limit, so the weights live in their own data files


def _stage(batch_fn=None, width=WIDTH, extra=False, num_steps=4):
  """Linear regression on fixed random data; ``batch_fn(step)`` may spoil a batch."""
  tx = optax.sgd(0.05)

  def init_fn(rng):
    params = {'w': 0.1 * jax.random.normal(rng, (width,)), 'b': jnp.zeros(())}
    if extra:
      params['c'] = jnp.zeros((3,))
    return state_lib.init_state(params, tx)

  def loss_fn(params, batch, rng):
    del rng
    mse = jnp.mean((batch['x'] @ params['w'] + params['b'] - batch['y']) ** 2)
    root = jnp.mean(jnp.sqrt(jnp.abs(params['w'] * batch['g'][0])))  # d/dw is 0/0 when g = 0
    return mse + 1e-3 * root, {'mse': mse, 'root': root}

  def batches(start_step):
    for step in range(start_step, 10 ** 6):
      rng = np.random.default_rng(step)
      x = rng.normal(size=(8, width)).astype(np.float32)
      batch = {'x': x, 'y': x[:, :4].sum(1), 'g': np.ones(8, np.float32)}
      yield batch_fn(step, batch) if batch_fn else batch

  return loop.Stage(name='tiny', num_steps=num_steps, batch_size=8, init_fn=init_fn,
                    update_fn=state_lib.make_update(loss_fn, tx), batches=batches)


def _train_config(**overrides):
  return ml_collections.ConfigDict({**dict(seed=0, log_every=2, checkpoint_every=2,
                                           keep_checkpoints=5, on_nonfinite='stop'), **overrides})


def _run(workdir, stage=None, **overrides):
  writer = metric_writers.create_default_writer(str(workdir), just_logging=True)
  return loop.run(stage or _stage(), str(workdir), _train_config(**overrides),
                  mesh_lib.make_mesh(), writer)


def _ckpt(workdir):
  return pathlib.Path(workdir) / 'tiny' / 'ckpt'


def _steps(workdir):
  return sorted(int(p.name) for p in _ckpt(workdir).iterdir() if p.name.isdigit())


def _restore(workdir, step):
  mngr = checkpoint._open(str(_ckpt(workdir)))  # pylint: disable=protected-access
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore())
  finally:
    mngr.close()


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4) to copy, and its final params."""
  workdir = tmp_path_factory.mktemp('finished')
  final = _run(workdir)
  return workdir, jax.device_get(final['params'])


def _copy(finished, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(finished[0], workdir)
  os.remove(workdir / 'tiny' / 'done.json')  # as if killed before the end
  return workdir


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


# ----------------------------------------------------------------------------- checkpoints

def test_run_killed_while_writing_resumes_from_the_last_complete_checkpoint(finished, tmp_path, caplog):
  workdir = _copy(finished, tmp_path)
  # Orbax writes a step under a tmp name and renames it once complete: a kill mid-save
  # leaves the tmp folder (here with its files half there), never a step folder.
  half = _ckpt(workdir) / '4.orbax-checkpoint-tmp-1700000000000000'
  (_ckpt(workdir) / '4').rename(half)
  shutil.rmtree(half / 'default' / 'ocdbt.process_0')
  with caplog.at_level('INFO'):
    final = _run(workdir)
  assert 'resumed from step 2' in caplog.text
  _assert_same_params(jax.device_get(final['params']), finished[1])
  assert _steps(workdir) == [2, 4]


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'delete_metadata'])
def test_corrupt_checkpoint_is_named_and_the_previous_one_used(finished, tmp_path, caplog, damage):
  workdir = _copy(finished, tmp_path)
  step4 = _ckpt(workdir) / '4'
  data = [p for p in (step4 / 'default').rglob('*') if p.is_file() and '/d/' in str(p)]
  assert data
  for p in data:
    if damage == 'truncate':
      p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 3])
    elif damage == 'garbage':
      p.write_bytes(os.urandom(len(p.read_bytes())))
  if damage == 'delete_metadata':
    (step4 / 'default' / '_METADATA').unlink()
  intact_step2 = _tree_bytes(_ckpt(workdir) / '2')
  final = _run(workdir)
  assert f'checkpoint {step4} is unreadable' in caplog.text
  _assert_same_params(jax.device_get(final['params']), finished[1])
  moved = list((workdir / 'tiny' / checkpoint.UNREADABLE_DIR).iterdir())
  assert [p.name.split('-')[0] for p in moved] == ['4']  # kept for inspection, out of the way
  assert _steps(workdir) == [2, 4] and _tree_bytes(_ckpt(workdir) / '2') == intact_step2


def test_checkpoint_of_another_model_is_refused_listing_the_keys(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _tree_bytes(_ckpt(workdir))
  with pytest.raises(checkpoint.CheckpointError, match=(
      r'(?s)tiny/ckpt/4 was saved by a different model or config: \d+ key\(s\) differ: .*'
      r'params/c: model \(3,\) float32, not in the checkpoint.*'
      r'params/w: checkpoint \(512,\) float32, model \(256,\) float32')):
    _run(workdir, _stage(width=256, extra=True))
  assert _tree_bytes(_ckpt(workdir)) == before  # nothing overwritten, nothing moved
  # The same refusal when a finished stage is loaded (a teacher for KD, --mode=eval).
  shapes = jax.eval_shape(_stage(width=256).init_fn, jax.random.key(0))
  with pytest.raises(checkpoint.CheckpointError, match=r'params/w: checkpoint \(512,\)'):
    checkpoint.load_params(str(_ckpt(workdir)), shapes, 'tiny')


# ----------------------------------------------------------------------------- diverging runs

def _spoil(kind, at=2):
  """Spoils the batch of update `at` (it makes step at + 1): a NaN input or a 0/0 gradient."""
  def batch_fn(step, batch):
    if step == at:
      if kind == 'loss':
        batch['x'][0, 0] = np.nan
      else:
        batch['g'][:] = 0.0
    return batch
  return batch_fn


@pytest.mark.parametrize('kind, named', [('loss', r'loss=nan, mse=nan'), ('gradient', r'grad_norm=nan')])
def test_nonfinite_step_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(
    tmp_path, kind, named):
  with pytest.raises(FloatingPointError, match=(
      rf'stage tiny: non-finite {named}.* at step 3; stopped, the last good checkpoint is kept '
      rf'\(step 2 in .*tiny/ckpt\)')):
    _run(tmp_path, _stage(_spoil(kind), num_steps=6))
  assert _steps(tmp_path) == [2]  # step 4 was not saved
  assert np.all(np.isfinite(_restore(tmp_path, 2)['params']['w']))
  assert not (tmp_path / 'tiny' / 'done.json').exists()


def test_nonfinite_step_is_skipped_by_config(tmp_path, caplog):
  final = _run(tmp_path, _stage(_spoil('loss'), num_steps=6), on_nonfinite='skip')
  assert 'step 3 skipped (train.on_nonfinite=skip)' in caplog.text
  assert json.loads((tmp_path / 'tiny' / 'done.json').read_text())['skipped_steps'] == [3]
  w = jax.device_get(final['params']['w'])
  assert np.all(np.isfinite(w)) and int(final['step']) == 6
  metrics = [json.loads(line) for line in (tmp_path / 'tiny' / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(v) for row in metrics for v in row.values())
  assert _steps(tmp_path) == [2, 4, 6]


def test_skip_update_leaves_params_optimizer_and_model_state_unchanged():
  tx = optax.adam(0.1)

  def loss_fn(params, batch, rng, model_state):
    del rng
    loss = jnp.mean(batch['x'] * params['w'])
    return loss, ({}, {'count': model_state['count'] + 1})

  update = jax.jit(state_lib.make_update(loss_fn, tx), static_argnames='skip_nonfinite')
  state = state_lib.init_state({'w': jnp.ones(3)}, tx, {'count': jnp.zeros(())})
  good, metrics = update(state, {'x': jnp.ones(3)}, jax.random.key(0), skip_nonfinite=True)
  assert float(metrics['skipped']) == 0 and float(good['model_state']['count']) == 1
  bad, metrics = update(good, {'x': jnp.array([1.0, jnp.inf, 1.0])}, jax.random.key(0),
                        skip_nonfinite=True)
  assert float(metrics['skipped']) == 1 and int(bad['step']) == 2
  jax.tree.map(np.testing.assert_array_equal,
               {k: good[k] for k in ('params', 'opt_state', 'model_state')},
               {k: bad[k] for k in ('params', 'opt_state', 'model_state')})


# ----------------------------------------------------------------------------- untrusted files

_FORBIDDEN_CALLS = {'eval', 'exec', 'compile', '__import__'}
_FORBIDDEN_ATTRS = {('pickle', 'load'), ('pickle', 'loads'), ('marshal', 'loads'),
                    ('yaml', 'load'), ('dill', 'load'), ('dill', 'loads')}


def test_no_code_loads_pickles_or_evaluates_strings_outside_the_restricted_loader():
  found = []
  for path in [*(REPO / 'faceflax').rglob('*.py'), REPO / 'main.py', *(REPO / 'configs').rglob('*.py')]:
    for node in ast.walk(ast.parse(path.read_text())):
      where = f'{path.relative_to(REPO)}:{getattr(node, "lineno", 0)}'
      if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in _FORBIDDEN_CALLS:
          found.append(f'{where} {func.id}()')
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and (func.value.id, func.attr) in _FORBIDDEN_ATTRS):
          found.append(f'{where} {func.value.id}.{func.attr}()')
        for kw in node.keywords:
          if kw.arg == 'allow_pickle' and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
            found.append(f'{where} allow_pickle={ast.unparse(kw.value)}')
      if isinstance(node, ast.ClassDef) and any('Unpickler' in ast.unparse(b) for b in node.bases):
        if node.name != '_RestrictedUnpickler':
          found.append(f'{where} class {node.name}')
  assert not found, found


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_in_a_bin_file_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'pwned'
  evil = tmp_path / 'evil.bin'
  evil.write_bytes(pickle.dumps(([_Payload(str(marker)), b'\xff\xd8\xff'], [True])))
  with pytest.raises(DataError, match=r'evil\.bin: refusing to load global pathlib\.\w*Path\.touch'):
    pairs.read_bin(evil)
  assert not marker.exists()


def test_pickled_npy_array_is_refused(tmp_path):
  path = tmp_path / 'teacher.npy'
  np.save(path, np.array([{'a': 1}], dtype=object), allow_pickle=True)
  with pytest.raises(DataError, match=r'teacher\.npy: not a readable plain \.npy array'):
    load_array(path)


def test_preprocessing_strings_are_parsed_as_literals_never_run(tmp_path):
  marker = tmp_path / 'pwned'
  for spec in (f'resize(__import__("os").system("touch {marker}"))',
               f'resize(open("{marker}", "w"))', 'value_range(lo=(lambda: 1)())'):
    with pytest.raises(ValueError, match='bad preprocessing op'):
      get_preprocess_fn(spec)
  with pytest.raises(ValueError, match="unknown preprocessing op 'system'"):
    get_preprocess_fn('system("ls")')
  assert not marker.exists()


# ----------------------------------------------------------------------------- workdir and disk

@pytest.mark.parametrize('make', ['under_a_file', 'read_only_fs'])
def test_unwritable_workdir_is_a_clear_error_at_start(tmp_path, make):
  config = configs_for_tests.load('fbp_kd', 'test')
  if make == 'under_a_file':
    (tmp_path / 'file').write_text('x')
    workdir = str(tmp_path / 'file' / 'w')
  else:
    workdir = '/proc'  # read-only even for root, whom os.access would let through
  with pytest.raises(files.WorkdirError, match=rf'workdir {workdir} is not writable'):
    app.run(config, workdir)


def test_too_little_disk_space_is_refused_before_training(finished, tmp_path, monkeypatch):
  workdir = _copy(finished, tmp_path)
  before = _tree_bytes(_ckpt(workdir))
  monkeypatch.setattr(files.shutil, 'disk_usage', lambda _: shutil._ntuple_diskusage(1, 1, 100))
  with pytest.raises(files.WorkdirError, match=r'tiny: 0\.0 MiB free, a checkpoint needs about'):
    _run(workdir)
  assert _tree_bytes(_ckpt(workdir)) == before


def test_failed_save_names_the_step_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(checkpoint.CheckpointError, match=(
      r'could not save the checkpoint of step 4 in .*tiny/ckpt \(OSError: .*No space left on '
      r'device\); the checkpoints saved before are intact \(newest: step 2\)')):
    _run(tmp_path)
  assert _steps(tmp_path) == [2]
  assert np.all(np.isfinite(_restore(tmp_path, 2)['params']['w']))
  assert not (tmp_path / 'tiny' / 'done.json').exists()


def test_results_json_is_never_left_half_written(tmp_path, monkeypatch):
  path = tmp_path / 'results.json'
  stages.write_json(str(path), {'run': 1})

  def full_disk(obj, f, **kwargs):
    f.write('{"run": ')
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(files.json, 'dump', full_disk)
  with pytest.raises(OSError, match='No space left'):
    stages.write_json(str(path), {'run': 2})
  assert json.loads(path.read_text()) == {'run': 1}
  assert os.listdir(tmp_path) == ['results.json']  # no temporary file left behind
