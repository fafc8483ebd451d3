"""Record stores and the streaming input path: same batches as the in-memory path, exact
resume, disjoint per-process reads, insightface packs, and errors naming the file or record."""
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from faceflax.data import DataError, bad_data, folder, pipeline, records, sources
from tests.test_data import _assert_batches_equal as _assert_same

CACHE_PP = 'decode|resize(8)'
TRAIN_PP = 'random_resized_crop(6)|flip_lr|color_jitter(0.2, 0.2, 0.2)|value_range(-1, 1)'


def _jpeg(value, size=(12, 10)) -> bytes:
  buf = io.BytesIO()
  Image.new('RGB', size, (value, 255 - value, (7 * value) % 256)).save(buf, format='JPEG')
  return buf.getvalue()


@pytest.fixture
def source(tmp_path):
  """A folder-format dataset: 24 train rows, 6 val; 'score' = labels.csv row."""
  root = tmp_path / 'faces'
  (root / 'images' / 'sub').mkdir(parents=True)
  lines = ['filename,score,group,split']
  for i in range(30):
    (root / 'images' / 'sub' / f'im{i}.jpg').write_bytes(_jpeg(8 * i))
    lines.append(f'sub/im{i}.jpg,{i},{"AF" if i % 2 else "CM"},{"train" if i < 24 else "val"}')
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  return root


@pytest.fixture
def store(source, tmp_path):
  return records.prepare_folder(source, tmp_path / 'store', records_per_shard=7)


def _batches(images, labels, n, **kwargs):
  kwargs = {'batch_size': 4, 'pp': TRAIN_PP, 'seed': 0, 'cache_pp': CACHE_PP, **kwargs}
  return list(itertools.islice(pipeline.make_train_dataset(images, labels, **kwargs), n))


def test_store_reads_like_the_folder(source, store):
  manifest = json.loads((store / records.MANIFEST).read_text())
  assert [s['num_records'] for s in manifest['shards']] == [6] * 5  # 30 in shards of at most 7
  for split in ('train', 'val', None):
    ours = folder.read_folder(store, split, label_columns=('score',))
    ref = folder.read_folder(source, split, label_columns=('score',))
    assert len(ours) == len(ref) and ours.store is not None
    for key in ref.labels:
      np.testing.assert_array_equal(ours.labels[key], ref.labels[key], err_msg=key)
    assert list(ours.paths) == [os.path.relpath(p, source / 'images') for p in ref.paths]
    # Record by record, the bytes are the source files'.
    got = ours.store.read(ours.rows)
    assert got == [Path(p).read_bytes() for p in ref.paths]
  with pytest.raises(DataError, match="no records with split 'test'.*'train', 'val'"):
    folder.read_folder(store, 'test')


@pytest.mark.parametrize('start_step', [0, 5, 13])
def test_streaming_gives_the_cached_batches_and_resumes_exactly(source, store, start_step):
  ref = folder.read_folder(source, 'train', label_columns=('score',))
  ours = folder.read_folder(store, 'train', label_columns=('score',))
  labels = lambda e: {'score': e.labels['score']}
  cached = _batches(ref.images, labels(ref), 14, mode='cache')  # 6 steps per epoch: 2+ epochs
  for images, ex, mode in ((ours.images, ours, 'stream'), (ref.images, ref, 'stream'),
                           (ours.images, ours, 'cache')):
    resumed = _batches(images, labels(ex), 14 - start_step, mode=mode, start_step=start_step)
    _assert_same(resumed, cached[start_step:])


def test_processes_read_disjoint_records_covering_the_epoch(store):
  ours = folder.read_folder(store, 'train', label_columns=('score',))
  kwargs = dict(mode='stream', batch_size=8, pp='value_range(-1, 1)')
  labels = {'score': ours.labels['score']}
  whole = _batches(ours.images, labels, 3, **kwargs)  # one epoch: 24 faces, batch 8
  parts = [_batches(ours.images, labels, 3, process_index=p, process_count=2, **kwargs)
           for p in range(2)]
  seen = [np.concatenate([b['score'] for b in part]) for part in parts]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == sorted(ours.labels['score'])  # each once
  for step in range(3):  # stacking the processes' batches gives the 1-process batch
    for key in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])


def test_auto_mode_streams_what_does_not_fit(store):
  ours = folder.read_folder(store, 'train', label_columns=('score',))
  reader = pipeline._Reader(ours.images, {})
  assert pipeline.choose_mode(reader, pipeline.InputOptions(CACHE_PP, 'auto', 1.0)) == 'cache'
  # 24 faces of 8x8x3 bytes plus an int64 index each: 4,800 bytes.
  tiny = 4000 / 2**30
  assert pipeline.choose_mode(reader, pipeline.InputOptions(CACHE_PP, 'auto', tiny)) == 'stream'


def test_eval_over_a_store_in_order(source, store):
  ours = folder.read_folder(store, 'val', label_columns=('score',))
  ref = folder.read_folder(source, 'val', label_columns=('score',))
  for mode in ('stream', 'cache'):
    got = list(pipeline.make_eval_dataset(ours.images, {'score': ours.labels['score']},
                                          batch_size=4, pp='value_range(-1, 1)', mode=mode,
                                          cache_pp=CACHE_PP))
    want = list(pipeline.make_eval_dataset(ref.images, {'score': ref.labels['score']},
                                           batch_size=4, pp='value_range(-1, 1)',
                                           cache_pp=CACHE_PP))
    _assert_same(got, want)


# ----------------------------------------------------------------------------- bad input

def test_stores_and_folders_read_as_one_sequence(source, store, tmp_path):
  """A store among pretraining's unlabeled datasets (fbp_kd data.unlabeled, face_prior
  data.datasets) joins the folders' images: the same bytes in the same order, so the same
  batches as when every dataset is a folder."""
  plain = tmp_path / 'plain'
  plain.mkdir()
  for i in range(5):
    (plain / f'p{i}.jpg').write_bytes(_jpeg(100 + 9 * i))
  ref = sources.list_unlabeled_images([source, plain])
  mixed = sources.list_unlabeled_images([store, plain])
  assert isinstance(ref, tuple) and isinstance(mixed, pipeline.ConcatImages)
  assert len(mixed) == len(ref) == 24 + 5  # the train split of each, every plain image
  order = np.random.default_rng(0).permutation(len(ref))
  assert mixed.read(order) == [Path(ref[i]).read_bytes() for i in order]
  assert mixed.describe(25) == str(plain / 'p1.jpg') and 'store record' in mixed.describe(3)
  head = pipeline.head(mixed, 26)
  assert head.read(np.arange(26)) == [Path(p).read_bytes() for p in ref[:26]]
  labels = {'position': np.arange(len(ref))}
  want = _batches(ref, labels, 9, mode='cache')  # 7 steps per epoch
  for mode in ('stream', 'cache'):
    _assert_same(_batches(mixed, labels, 9, mode=mode), want)


def test_truncated_shard_is_named(store):
  shard = store / records.SHARD_PATTERN.format(1, 5)
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(DataError, match=f'{shard.name}: .* bytes, but .*truncated or rewritten'):
    folder.read_folder(store)


def test_manifest_older_than_its_data(store, source):
  shard = store / records.SHARD_PATTERN.format(0, 5)
  st = shard.stat()
  os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  with pytest.raises(DataError, match=f'{shard.name}: modified after .*older than its data'):
    folder.read_folder(store)
  os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
  folder.read_folder(store)  # back as recorded: fine
  with open(source / 'labels.csv', 'a') as f:
    f.write('sub/im0.jpg,3,AF,train\n')
  with pytest.raises(DataError, match='labels.csv changed after the store'):
    folder.read_folder(store)


def test_store_not_written_over_anything(source, store, tmp_path):
  with pytest.raises(DataError, match='already holds a store'):
    records.prepare_folder(source, store)
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(DataError, match='not an empty folder or a store'):
    records.prepare_folder(source, other)
  assert (other / 'notes.txt').read_text() == 'mine'


def test_record_that_does_not_decode_while_streaming_is_named(tmp_path):
  # A store written without screening (as if damaged after it): record 5 is not an image.
  data = [_jpeg(10 * i) for i in range(8)]
  data[5] = b'\xff\xd8\xff' + b'garbage' * 20
  store = records.write_store(
      tmp_path / 'store', 8, data.__getitem__,
      {'filename': [f'f{i}.jpg' for i in range(8)], 'score': np.arange(8, dtype=np.float32)},
      source={'kind': 'test'}, screened={}, records_per_shard=3)
  ex = folder.read_folder(store, label_columns=('score',))
  with pytest.raises(DataError, match=r'do not decode.*images-00002-of-00003.array_record '
                                      r'record 0 \(store record 5, f5.jpg\): not an image'):
    _batches(ex.images, {}, 4, mode='stream', batch_size=4)


def test_prepare_screens_once_and_skips_with_the_policy(source, tmp_path):
  (source / 'images' / 'sub' / 'im3.jpg').write_bytes(b'not an image')
  with pytest.raises(DataError, match='im3.jpg'):
    records.prepare_folder(source, tmp_path / 'a')
  assert not records.is_store(tmp_path / 'a')
  with bad_data.policy(skip=True):
    store = records.prepare_folder(source, tmp_path / 'b')
  manifest = json.loads((store / records.MANIFEST).read_text())
  assert manifest['num_records'] == 29
  assert manifest['screened']['skipped']['count'] == 1
  assert 'im3.jpg' in manifest['screened']['skipped']['examples'][0]
  ex = folder.read_folder(store)
  assert len(ex) == 29 and 3 not in ex.store.column('row')[ex.rows]


# ----------------------------------------------------------------------------- insightface

def _pack(root, num_ids=5, per_id=4, corrupt=None):
  """A pack as insightface writes it: header record 0 (label = [first non-image key,
  end]), the images (keys 1..), then one identity-range record per identity."""
  root.mkdir(parents=True, exist_ok=True)
  images, ids = [], []
  for identity in range(num_ids):
    for shot in range(per_id):
      images.append(_jpeg(40 * identity + 3 * shot, size=(16, 16)))
      ids.append(identity)
  if corrupt is not None:
    images[corrupt] = b'\xff\xd8\xff' + b'\x00' * 40
  n = len(images)
  rows = [(0, 2, [n + 1, n + 1 + num_ids], b'')]
  rows += [(i + 1, 0, ids[i], images[i]) for i in range(n)]
  rows += [(n + 1 + j, 2, [1 + j * per_id, 1 + (j + 1) * per_id], b'') for j in range(num_ids)]
  records.write_recordio(root / 'train.rec', root / 'train.idx', rows)
  return images, ids


def test_insightface_pack_row_by_row(tmp_path):
  pack = tmp_path / 'faces_webface_112x112'
  images, ids = _pack(pack)
  with pytest.raises(DataError, match='without an index: run `python -m faceflax.data.prepare'):
    folder.read_folder(pack)
  records.prepare_insightface(pack)
  ex = folder.read_folder(pack, 'train', label_columns=('identity',))
  assert len(ex) == len(images) == 20
  np.testing.assert_array_equal(ex.labels['identity'], ids)
  assert ex.store.read(ex.rows) == images
  assert ex.paths[0] == 'train.rec#1'
  batches = _batches(ex.images, {'label': ex.labels['identity']}, 5, mode='stream',
                     pp='value_range(-1, 1)')
  assert batches[0]['image'].shape == (4, 8, 8, 3)
  # A record header read directly, as mxnet.recordio.unpack gives it.
  fd = os.open(pack / 'train.rec', os.O_RDONLY)
  try:
    first = records.read_recordio_record(fd, 0, lambda: 'record 0')
  finally:
    os.close(fd)
  assert first.flag == 2 and list(first.label) == [21, 26] and first.image == b''


def test_insightface_corrupt_record_is_named(tmp_path):
  pack = tmp_path / 'pack'
  _pack(pack, corrupt=6)
  with pytest.raises(DataError, match=r'train.rec: 1 unreadable image.*train.rec#7: not an image'):
    records.prepare_insightface(pack)
  with bad_data.policy(skip=True):
    records.prepare_insightface(pack, tmp_path / 'index')
  ex = folder.read_folder(tmp_path / 'index')
  assert len(ex) == 19 and 'train.rec#7' not in list(ex.paths)


def test_insightface_idx_that_disagrees_with_its_rec(tmp_path):
  pack = tmp_path / 'pack'
  _pack(pack)
  lines = (pack / 'train.idx').read_text().splitlines()
  key, offset = lines[3].split('\t')
  lines[3] = f'{key}\t{int(offset) + 4}'
  (pack / 'train.idx').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match=r'train.rec record 3 at byte \d+: no RecordIO record'):
    records.prepare_insightface(pack)
  lines[3] = f'{key}\t99999999'
  (pack / 'train.idx').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match=r'train.idx: line 4: offset 99999999 is past the end'):
    records.prepare_insightface(pack)
  lines[3] = 'three\tfour'
  (pack / 'train.idx').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match=r'train.idx: line 4: expected "key<TAB>offset"'):
    records.prepare_insightface(pack)


def test_insightface_rec_changed_after_indexing(tmp_path):
  pack = tmp_path / 'pack'
  _pack(pack)
  records.prepare_insightface(pack)
  with open(pack / 'train.rec', 'ab') as f:
    f.write(b'\x00' * 8)
  with pytest.raises(DataError, match='train.rec: .* bytes, but .*truncated or rewritten'):
    folder.read_folder(pack)


# ----------------------------------------------------------------------------- training

def _identities_as_pack(identities, pack):
  """The synthetic identities' train rows as an insightface pack, their val pairs as a .bin."""
  from faceflax.data import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
  ex = folder.read_folder(identities, 'train', label_columns=('identity',))
  pack.mkdir()
  n = len(ex)
  rows = [(0, 2, [n + 1, n + 1], b'')]
  rows += [(i + 1, 0, ex.labels['identity'][i], Path(p).read_bytes())
           for i, p in enumerate(ex.paths)]
  records.write_recordio(pack / 'train.rec', pack / 'train.idx', rows)
  p = pairs_lib.read_pairs_csv(identities / 'pairs_val.csv', identities / 'images')
  pairs_lib.write_bin(pack / 'val.bin', [Path(a).read_bytes() for a in p.paths_a],
                      [Path(b).read_bytes() for b in p.paths_b], p.same)
  return ex


def test_lqfr_trains_from_an_insightface_pack_and_scores_its_bin(tmp_path):
  from faceflax import app  # pylint: disable=g-import-not-at-top
  from faceflax.data import synthetic  # pylint: disable=g-import-not-at-top
  from tests import configs_for_tests  # pylint: disable=g-import-not-at-top
  config = configs_for_tests.load('lqfr_kd', 'test')
  s = config.data.synthetic
  identities = Path(synthetic.write_identity_dataset(
      tmp_path / 'ids', num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids,
      per_id=s.per_id, num_pairs=s.num_pairs, size=s.size, seed=s.seed))
  pack = tmp_path / 'faces_toy_112x112'
  ex = _identities_as_pack(identities, pack)
  records.prepare_insightface(pack)
  config.data.dir = str(pack)
  config.data.eval_pairs = 'val.bin'
  config.eval.qualities = 'hq,x2'
  config.data.input = 'stream'
  config.stages = 'teacher,evaluate'
  results = app.run(config, str(tmp_path / 'work'))
  facts = json.loads((tmp_path / 'work' / 'model_facts.json').read_text())
  assert facts['num_classes'] == len(np.unique(ex.labels['identity'])) == s.num_train_ids
  table = results['teacher']
  assert set(table) >= {'hq', 'x2_both', 'x2_probe_vs_hq'}
  assert results['data']['num_pairs'] == s.num_pairs
  rows = [json.loads(l) for l in (tmp_path / 'work' / 'teacher' / 'metrics.jsonl').open()]
  assert [r['step'] for r in rows] == [2, 4] and all(np.isfinite(r['loss']) for r in rows)

