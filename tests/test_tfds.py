"""The TFDS builders give the rows, labels and image bytes of the faceflax readers.

Fixtures are tiny generated images in each official layout, never real faces.
"""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from faceflax.data import DataError, age_datasets, celeba, fer2013, scut_fbp5500
from faceflax.data import tfds as builders
from faceflax.data.tfds import __main__ as command_line

_RNG = np.random.default_rng(0)


def _write_jpeg(path, size=(6, 5)):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = _RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format='JPEG')


def _build(builder_cls, manual_dir, data_dir, config=None):
  builder = builder_cls(data_dir=str(data_dir), config=config)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _rows(builder, split, key='filename', raw_images=True):
  """The split's rows as numpy, sorted by `key`; `raw_images`: images as their stored bytes."""
  decoders = {'image': tfds.decode.SkipDecoding()} if raw_images else None
  dataset = builder.as_dataset(split=split, decoders=decoders)
  return sorted(tfds.as_numpy(dataset), key=lambda row: row[key])


def _assert_matches_reader(builder, split, examples, root, labels=None):
  """Same images (byte for byte) and labels as the reader, row for row."""
  rows = _rows(builder, split)
  names = [os.path.relpath(p, root) for p in examples.paths]
  order = sorted(range(len(names)), key=names.__getitem__)
  assert [row['filename'].decode() for row in rows] == [names[i] for i in order]
  for row, i in zip(rows, order):
    assert row['image'] == Path(examples.paths[i]).read_bytes()
    for key in labels or examples.labels:
      assert row[key] == examples.labels[key][i], (key, names[i])
  return rows


def test_scut_fbp5500(tmp_path):
  root = tmp_path / 'manual' / 'SCUT-FBP5500_v2'  # A sub-folder of manual_dir.
  names = ['AF1', 'AF2', 'AM3', 'CF4', 'CM5']
  for name in names:
    _write_jpeg(root / 'Images' / f'{name}.jpg')
  lists = root / 'train_test_files'
  split_60_40 = lists / 'split_of_60%training and 40%testing'
  split_60_40.mkdir(parents=True)
  (split_60_40 / 'train.txt').write_text('AF1.jpg 3.5\nAM3.jpg 2.25\nCM5.jpg 1.0\n')
  (split_60_40 / 'test.txt').write_text('AF2.jpg 4.75\nCF4.jpg 3.0\n')
  cv3 = lists / '5_folders_cross_validations_files' / 'cross_validation_3'
  cv3.mkdir(parents=True)
  (cv3 / 'train_3.txt').write_text(''.join(f'{n}.jpg 2.5\n' for n in names[1:]))
  (cv3 / 'test_3.txt').write_text('AF1.jpg 3.5\n')
  for protocol, sizes in (('60_40', (3, 2)), ('cv3', (4, 1))):
    builder = _build(builders.scut_fbp5500.ScutFbp5500, tmp_path / 'manual', tmp_path / 'tfds',
                     protocol)
    for split, size in zip(('train', 'test'), sizes):
      examples = scut_fbp5500.read_official(root, split, protocol)
      assert len(_assert_matches_reader(builder, split, examples, root)) == size
  assert builder.info.supervised_keys == ('image', 'score')


def test_utkface_skips_names_without_race(tmp_path):
  names = [f'{age}_{age % 2}_{age % 5}_20170109{age:04d}.jpg.chip.jpg' for age in range(1, 31)]
  for name in names:
    _write_jpeg(tmp_path / 'UTKFace' / name)
  _write_jpeg(tmp_path / 'UTKFace' / '39_1_20170116174525125.jpg.chip.jpg')
  builder = _build(builders.utkface.Utkface, tmp_path / 'UTKFace', tmp_path / 'tfds')
  total = 0
  for split in ('train', 'val'):
    examples, skipped = age_datasets.read_utkface(tmp_path / 'UTKFace', split,
                                                  skip_malformed=True)
    assert skipped == ('39_1_20170116174525125.jpg.chip.jpg',)
    total += len(_assert_matches_reader(builder, split, examples, tmp_path / 'UTKFace'))
  assert total == len(names)
  assert builder.info.features['race'].names[1] == 'black'


def test_morph2(tmp_path):
  lines = ['ID_num,Photo,Age,Gender,Race']
  for subject, gender, race in (('003476', 'M', 'B'), ('101010', 'F', 'W'), ('222222', 'M', 'H')):
    for shot in range(2):
      photo = f'Album2/{subject}_0{shot}M{20 + shot}.JPG'
      _write_jpeg(tmp_path / 'MORPH' / photo)
      lines.append(f'{subject},{photo},{20 + shot},{gender},{race}')
  (tmp_path / 'MORPH' / 'morph_2008_nonCommercial.csv').write_text('\n'.join(lines) + '\n')
  builder = _build(builders.morph2.Morph2, tmp_path, tmp_path / 'tfds')
  sizes = []
  for split in ('train', 'test'):
    examples = age_datasets.read_morph(tmp_path / 'MORPH', split)
    sizes.append(len(_assert_matches_reader(builder, split, examples, tmp_path / 'MORPH')))
  assert sizes == [4, 2]  # Subject 101010 hashes below the 0.2 test fraction.


def test_adience_fold(tmp_path):
  """Fold k has 2 usable rows; fold 0 adds an unknown age and an age in no group."""
  header = 'user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang'
  ages = ['(0, 2)', '(4, 6)', '(8, 12)', '(15, 20)', '(25, 32)', '(38, 43)', '(48, 53)',
          '(60, 100)', '(25, 32)', '(8, 13)']
  for fold in range(5):
    rows = [(f'user{fold}', f'{fold}{i}.jpg', 10 * fold + i, ages[2 * fold + i],
             'mfu'[(fold + i) % 3]) for i in range(2)]  # 'u': gender -1.
    if fold == 0:
      rows += [('user0', 'x.jpg', 7, 'None', 'm'), ('user0', 'y.jpg', 8, '(38, 48)', 'f')]
    lines = [header]
    for user, image, face, age, gender in rows:
      _write_jpeg(tmp_path / 'faces' / user / f'coarse_tilt_aligned_face.{face}.{image}')
      lines.append(f'{user}\t{image}\t{face}\t{age}\t{gender}\t1\t2\t3\t4\t0')
    (tmp_path / f'fold_{fold}_data.txt').write_text('\n'.join(lines) + '\n')
  builder = _build(builders.adience.Adience, tmp_path, tmp_path / 'tfds', 'fold1')
  for split, size in (('train', 8), ('test', 2)):
    examples = age_datasets.read_adience(tmp_path, split, 'fold1').examples
    rows = _assert_matches_reader(builder, split, examples, tmp_path)
    assert len(rows) == size
    assert split == 'test' or -1 in [row['gender'] for row in rows]
  assert [row['age_group'] for row in rows] == [2, 3]  # fold 1: (8, 12), (15, 20)
  assert builder.info.features['age_group'].names[3] == '15-20'


def _fer_csv(path, rows):
  lines = ['emotion,pixels,Usage']
  lines += [f'{emotion},{" ".join(map(str, pixels.ravel()))},{usage}'
            for emotion, pixels, usage in rows]
  path.write_text('\n'.join(lines) + '\n')


def test_fer2013(tmp_path):
  usages = ['Training', 'PublicTest', 'Training', 'PrivateTest', 'Training', 'PublicTest']
  faces = _RNG.integers(0, 256, (len(usages), 48, 48), dtype=np.uint8)
  _fer_csv(tmp_path / 'fer2013.csv', [(i, faces[i], u) for i, u in enumerate(usages)])
  builder = _build(builders.fer2013.Fer2013, tmp_path, tmp_path / 'tfds')
  for split, lines in (('train', [2, 4, 6]), ('val', [3, 7]), ('test', [5])):
    rows = _rows(builder, split, key='line', raw_images=False)
    assert [row['line'] for row in rows] == lines
    for row, parsed in zip(rows, fer2013.read_fer2013(tmp_path / 'fer2013.csv', split)):
      assert row['emotion'] == parsed.emotion == row['line'] - 2
      np.testing.assert_array_equal(row['image'], parsed.image)
      np.testing.assert_array_equal(row['image'][..., 0], faces[row['line'] - 2])
  assert builder.info.features['emotion'].names == list(fer2013.EMOTIONS)


@pytest.mark.parametrize('old, new, match', [
    (',PublicTest', ',Public', r"line 3: column Usage: 'Public'"),
    ('\n6,', '\n9,', r"line 3: column emotion: '9'"),
    (',PublicTest', ' 1,PublicTest', r'line 3: column pixels: expected 2304 values, got 2305'),
    (',PublicTest', '.5,PublicTest', r"line 3: column pixels: value 2304 is '\d+\.5'"),
    (',PublicTest', ',x,PublicTest', r'line 3: expected 3 fields, got 4'),
])
def test_fer2013_bad_row_names_the_line(tmp_path, old, new, match):
  faces = np.full((2, 48, 48), 7, np.uint8)
  path = tmp_path / 'fer2013.csv'
  _fer_csv(path, [(0, faces[0], 'Training'), (6, faces[1], 'PublicTest')])
  path.write_text(path.read_text().replace(old, new, 1))
  with pytest.raises(DataError, match=rf'fer2013\.csv: {match}'):
    list(fer2013.read_fer2013(path))
  with pytest.raises(DataError, match=rf'fer2013\.csv: {match}'):
    _build(builders.fer2013.Fer2013, tmp_path, tmp_path / 'tfds')


def test_celeba(tmp_path):
  """The authors' Drive layout: Img/, Anno/, Eval/."""
  root = tmp_path / 'CelebA'
  names = [f'{i:06d}.jpg' for i in range(1, 8)]
  for name in names:
    _write_jpeg(root / 'Img' / 'img_align_celeba' / name, size=(9, 11))
  values = _RNG.choice([-1, 1], (len(names), len(celeba.ATTRIBUTES)))
  (root / 'Anno').mkdir()
  attr_lines = [str(len(names)), ' '.join(celeba.ATTRIBUTES)]
  attr_lines += [f'{n} ' + ' '.join(f'{v:2d}' for v in row) for n, row in zip(names, values)]
  (root / 'Anno' / 'list_attr_celeba.txt').write_text('\n'.join(attr_lines) + '\n')
  (root / 'Anno' / 'identity_CelebA.txt').write_text(
      ''.join(f'{n} {100 + i % 3}\n' for i, n in enumerate(names)))
  (root / 'Eval').mkdir()
  (root / 'Eval' / 'list_eval_partition.txt').write_text(
      ''.join(f'{n} {code}\n' for n, code in zip(names, [0, 0, 1, 0, 2, 1, 0])))
  builder = _build(builders.celeba.Celeba, tmp_path, tmp_path / 'tfds')
  for split, size in (('train', 4), ('val', 2), ('test', 1)):
    examples = celeba.read_celeba(root, split)
    rows = _assert_matches_reader(builder, split, examples, root, labels=['identity'])
    assert len(rows) == size
    for row, path in zip(rows, sorted(examples.paths)):
      expected = values[names.index(Path(path).name)] > 0
      assert [row['attributes'][a] for a in celeba.ATTRIBUTES] == list(expected)


def test_celeba_bad_lines(tmp_path):
  root = tmp_path / 'flat'  # Everything in one folder.
  _write_jpeg(root / 'img_align_celeba' / '000001.jpg')
  attributes = ' '.join(['1'] * len(celeba.ATTRIBUTES))
  (root / 'list_attr_celeba.txt').write_text(
      f'1\n{" ".join(celeba.ATTRIBUTES)}\n000001.jpg {attributes}\n')
  (root / 'identity_CelebA.txt').write_text('000001.jpg 5\n')
  (root / 'list_eval_partition.txt').write_text('000001.jpg 3\n')
  with pytest.raises(DataError, match=r"list_eval_partition\.txt: line 1: partition '3'"):
    celeba.read_celeba(root)
  (root / 'list_eval_partition.txt').write_text('000001.jpg 0\n000002.jpg 0\n')
  with pytest.raises(DataError, match=r'line 2: 000002\.jpg is not in identity_CelebA\.txt'):
    celeba.read_celeba(root)
  (root / 'list_eval_partition.txt').write_text('000001.jpg 0\n')
  assert celeba.read_celeba(root).labels['identity'].tolist() == [5]
  path = root / 'list_attr_celeba.txt'
  path.write_text(path.read_text().replace(' 1\n', ' 0\n'))
  with pytest.raises(DataError, match=r"list_attr_celeba\.txt: line 3: attribute value '0'"):
    celeba.read_celeba(root)


def test_command_line(tmp_path):
  """`python -m faceflax.data.tfds` runs tfds's build command on the registered builders."""
  (tmp_path / 'manual' / 'fer2013').mkdir(parents=True)  # The default manual_dir's layout.
  _fer_csv(tmp_path / 'manual' / 'fer2013' / 'fer2013.csv',
           [(3, np.zeros((48, 48), np.uint8), usage) for usage in fer2013.SPLITS.values()])
  command_line.main(['fer2013', f'--data_dir={tmp_path}', f'--manual_dir={tmp_path / "manual"}'])
  # array_record by default (training reads records by index): a random-access source.
  source = tfds.data_source('fer2013', split='val', data_dir=str(tmp_path), download=False)
  assert [row['line'] for row in source] == [3]
  command_line.main(['fer2013', f'--data_dir={tmp_path / "tf"}', '--file_format=tfrecord',
                     f'--manual_dir={tmp_path / "manual"}'])
  dataset = tfds.load('fer2013', split='val', data_dir=str(tmp_path / 'tf'), download=False)
  assert [row['line'] for row in tfds.as_numpy(dataset)] == [3]


# ----------------------------------------------------------------------------- training

def _scut_release(root, n=40):
  """SCUT-FBP5500's layout with ``n`` faces: 60/40 split, scores 1..5."""
  names = [f'{"AF" if i % 2 else "CM"}{i}' for i in range(n)]
  for name in names:
    _write_jpeg(root / 'Images' / f'{name}.jpg', size=(24, 24))
  split = root / 'train_test_files' / 'split_of_60%training and 40%testing'
  split.mkdir(parents=True)
  cut = n * 6 // 10
  for part, chosen in (('train', names[:cut]), ('test', names[cut:])):
    (split / f'{part}.txt').write_text(''.join(
        f'{m}.jpg {1 + 4 * _RNG.random():.3f}\n' for m in chosen))


def _utkface_release(root, n=60):
  for age in range(1, n + 1):
    _write_jpeg(root / f'{age}_{age % 2}_{age % 5}_20170109{age:04d}.jpg.chip.jpg', size=(24, 24))


def _celeba_release(root, num_ids=8, per_id=5):
  names = [f'{i:06d}.jpg' for i in range(1, num_ids * per_id + 1)]
  for name in names:
    _write_jpeg(root / 'Img' / 'img_align_celeba' / name, size=(24, 24))
  (root / 'Anno').mkdir()
  values = _RNG.choice([-1, 1], (len(names), len(celeba.ATTRIBUTES)))
  (root / 'Anno' / 'list_attr_celeba.txt').write_text('\n'.join(
      [str(len(names)), ' '.join(celeba.ATTRIBUTES)]
      + [f'{n} ' + ' '.join(f'{v:2d}' for v in row) for n, row in zip(names, values)]) + '\n')
  (root / 'Anno' / 'identity_CelebA.txt').write_text(
      ''.join(f'{n} {100 + i // per_id}\n' for i, n in enumerate(names)))
  (root / 'Eval').mkdir()
  partition = [0 if i < (num_ids - 2) * per_id else 1 if i < (num_ids - 1) * per_id else 2
               for i in range(len(names))]  # the last two identities: val, test
  (root / 'Eval' / 'list_eval_partition.txt').write_text(
      ''.join(f'{n} {p}\n' for n, p in zip(names, partition)))


# task: (builder, release writer, TFDS name, overrides of the task's test preset)
TRAIN_CASES = {
    'fbp_kd': (builders.scut_fbp5500.ScutFbp5500, _scut_release, 'scut_fbp5500/60_40',
               {'stages': 'teacher_finetune', 'teacher.finetune.from_pretrained': False}),
    'age_mtmsa': (builders.utkface.Utkface, _utkface_release, 'utkface',
                  {'stages': 'train,evaluate'}),
    'lqfr_kd': (builders.celeba.Celeba, _celeba_release, 'celeba', {'stages': 'teacher'}),
}


@pytest.mark.parametrize('task', sorted(TRAIN_CASES))
def test_task_trains_from_a_tfds_dataset(task, tmp_path):
  """``--config.data.tfds=NAME``: the task's test preset reads the TFDS build directly."""
  from faceflax import app  # pylint: disable=g-import-not-at-top
  from faceflax.data import records  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  builder_cls, write_release, name, overrides = TRAIN_CASES[task]
  write_release(tmp_path / 'release')
  config_name = name.split('/')[1] if '/' in name else None
  builder = builder_cls(data_dir=str(tmp_path / 'tfds'), config=config_name)
  builder.download_and_prepare(file_format='array_record', download_config=(
      tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'release'))))
  config = configs_for_tests.load(task, 'test')
  config.data.dir, config.data.tfds = '', name
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  results = app.run(config, str(tmp_path / 'work'))
  index = Path(builder.data_dir) / records.INDEX_FOLDER
  assert records.is_store(index)  # indexed once, beside the dataset
  stage = config.stages.split(',')[0]
  rows = [json.loads(l) for l in (tmp_path / 'work' / stage / 'metrics.jsonl').open()]
  assert rows and all(np.isfinite(r['loss']) for r in rows)
  if task == 'fbp_kd':  # the index holds both splits, labels as the reader gives them
    from faceflax.data import folder  # pylint: disable=g-import-not-at-top
    for split in ('train', 'test'):
      ours = folder.read_folder(index, split, label_columns=('score',))
      ref = scut_fbp5500.read_official(tmp_path / 'release', split, '60_40')
      assert sorted(zip(ours.paths, ours.labels['score'])) == sorted(
          (os.path.relpath(p, tmp_path / 'release'), s)
          for p, s in zip(ref.paths, ref.labels['score']))
  if task == 'age_mtmsa':
    assert results['age']['n'] == builder.info.splits['val'].num_examples


def _utkface_build(tmp_path, n=60):
  _utkface_release(tmp_path / 'release', n)
  builder = builders.utkface.Utkface(data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare(file_format='array_record', download_config=(
      tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'release'))))
  return builder


def test_face_prior_trains_from_a_tfds_build_and_a_store(tmp_path):
  """face_prior's data.datasets mixes 'tfds:NAME' entries and record stores."""
  import csv  # pylint: disable=g-import-not-at-top
  from faceflax import app  # pylint: disable=g-import-not-at-top
  from faceflax.data import records, synthetic  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  builder = _utkface_build(tmp_path)
  folder = tmp_path / 'faces'
  (folder / 'images').mkdir(parents=True)
  faces, _ = synthetic.make_faces(24, size=24, seed=0)
  rows = [('filename', 'split')]
  for i, face in enumerate(faces):
    Image.fromarray(face).save(folder / 'images' / f'{i:02d}.png')
    rows.append((f'{i:02d}.png', 'train' if i < 16 else 'val'))
  with open(folder / 'labels.csv', 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  store = records.prepare_folder(folder, tmp_path / 'store')
  config = configs_for_tests.load('face_prior', 'test')
  config.data.update(datasets=f'tfds:utkface,{store}', tfds_data_dir=str(tmp_path / 'tfds'))
  config.eval_batch_size = 8  # 5 + 8 val faces
  results = app.run(config, str(tmp_path / 'work'))
  val = results['val']
  assert val['n'] + val['n_left_out'] == builder.info.splits['val'].num_examples + 8
  assert all(np.isfinite(val[t]) for t in ('pixel', 'patch', 'component'))


def test_transfer_trains_from_a_tfds_build(tmp_path):
  """transfer's data.dirs.<task> = 'tfds:NAME': the probe and the fine-tuning read the build."""
  from faceflax import app  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  builder = _utkface_build(tmp_path)
  config = configs_for_tests.load('transfer', 'test')
  config.update(tasks='age', protocols='linear,finetune')
  config.data.dirs.age = 'tfds:utkface'
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  results = app.run(config, str(tmp_path / 'work'))
  for protocol in ('linear', 'finetune'):
    assert results['age'][protocol]['n_val'] == builder.info.splits['val'].num_examples
    assert np.isfinite(results['age'][protocol]['mae'])


def test_tfds_built_as_tfrecord_is_refused_by_name(tmp_path):
  from faceflax.data import records  # pylint: disable=g-import-not-at-top
  _utkface_release(tmp_path / 'release', n=30)
  _build(builders.utkface.Utkface, tmp_path / 'release', tmp_path / 'tfds')  # tfrecord
  with pytest.raises(DataError, match='stored as tfrecord.*--file_format=array_record'):
    records.tfds_store('utkface', str(tmp_path / 'tfds'))
  with pytest.raises(DataError, match="data.tfds='fer2013' is not built in"):
    records.tfds_store('fer2013', str(tmp_path / 'tfds'))
