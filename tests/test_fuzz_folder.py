"""Property test of the folder-format reader on fuzzed labels.csv contents and image bytes.

Whatever the bytes, ``read_folder`` either returns valid examples (paths inside
images/, finite float labels, images that decode as the pipeline decodes them) or
raises its documented error type, DataError; it never raises anything else and
never hangs (a per-example alarm and hypothesis' deadline bound it).
"""
import contextlib
import csv
import io
import pathlib
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from faceflax.data import DataError, bad_data, ops, read_folder

IMAGE_NAMES = ('a.png', 'b.jpg', 'c.bmp', 'sub/d.gif')


def _encoded(fmt, mode, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (9, 7, 3), np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(out, format=fmt)
  return out.getvalue()


VALID = [_encoded(fmt, mode, i) for i, (fmt, mode) in enumerate(
    [('PNG', 'RGB'), ('JPEG', 'RGB'), ('BMP', 'RGB'), ('GIF', 'P'), ('PNG', 'L'), ('JPEG', 'L'),
     ('PNG', 'RGBA')])]


def _flip(data, position, value):
  position %= len(data)
  return data[:position] + bytes([value]) + data[position + 1:]


image_bytes = st.one_of(
    st.sampled_from(VALID[:4]), st.sampled_from(VALID[:4]), st.sampled_from(VALID),
    st.builds(lambda d, f: d[:int(len(d) * f)], st.sampled_from(VALID), st.floats(0, 1)),
    st.builds(_flip, st.sampled_from(VALID), st.integers(0, 10 ** 4), st.integers(0, 255)),
    st.binary(max_size=48),
)
names = st.one_of(
    st.sampled_from(IMAGE_NAMES), st.sampled_from(IMAGE_NAMES),
    st.sampled_from(['missing.png', '../a.png', '/etc/passwd', 'sub/../../a.png', '', 'a.png\x00',
                     'sub', './a.png', 'sub//d.gif', 'A.PNG']),
    st.text(max_size=12))
cells = st.one_of(
    st.sampled_from(['1', '2.5', '-3', '0', '4.75', 'train', 'val']),
    st.sampled_from(['1', '2.5', '-3', '0', '4.75', 'train', 'val']),
    st.sampled_from(['', 'nan', 'inf', '-inf', '1e400', 'abc', ' 4 ', '"', ',', '\n']),
    st.text(max_size=8))


@st.composite
def csv_files(draw):
  """labels.csv bytes: mostly tables of fuzzed rows, sometimes arbitrary text or bytes."""
  kind = draw(st.sampled_from(['table'] * 12 + ['fuzzed header', 'text', 'bytes']))
  if kind == 'bytes':
    return draw(st.binary(max_size=200))
  if kind == 'text':
    return draw(st.text(max_size=200)).encode('utf-8', 'surrogatepass')
  if kind == 'table':
    extra = draw(st.lists(st.sampled_from(['split', 'label', 'group']), unique=True, max_size=3))
    header = ['filename', 'score', *extra]
  else:
    header = draw(st.lists(st.one_of(st.sampled_from(['filename', 'score', 'split']), st.text(max_size=5)),
                           max_size=5))
  rows = []
  for _ in range(draw(st.integers(1, 6))):
    row = [draw(names)] + [draw(cells) for _ in header[1:]]
    if draw(st.integers(0, 29)) == 0:  # a row with a field too many or too few
      row = row + [draw(cells)] if draw(st.booleans()) else row[:-1]
    rows.append(row)
  out = io.StringIO()
  csv.writer(out).writerows([header, *rows])
  return out.getvalue().encode('utf-8', 'surrogatepass')


@contextlib.contextmanager
def _time_limit(seconds):
  """Turns a hang into a test failure (hypothesis' deadline only reports slow examples)."""
  def fail(signum, frame):
    raise TimeoutError(f'read_folder took more than {seconds} s')
  previous = signal.signal(signal.SIGALRM, fail)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _check_valid(examples, root, label_columns):
  assert len(examples) > 0
  images_dir = (root / 'images').resolve()
  for path in examples.paths:
    assert images_dir in pathlib.Path(path).resolve().parents, path
    image = ops.decode_rgb(pathlib.Path(path).read_bytes())  # what the pipeline's 'decode' runs
    assert image.shape[-1] == 3 and image.dtype == np.uint8
  for column in label_columns:
    values = examples.labels[column]
    assert values.dtype == np.float32 and np.all(np.isfinite(values)), (column, values)
  assert len(examples.rows) == len(examples) and len(set(examples.rows.tolist())) == len(examples)


@settings(max_examples=100, deadline=3000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(csv_bytes=csv_files(), images=st.lists(image_bytes, min_size=4, max_size=4),
       split=st.sampled_from([None, 'train', 'val']),
       label_columns=st.sampled_from([(), ('score',), ('score', 'label')]),
       skip=st.booleans())
def test_read_folder_yields_valid_examples_or_data_error(csv_bytes, images, split, label_columns,
                                                          skip):
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    (root / 'images' / 'sub').mkdir(parents=True)
    for name, data in zip(IMAGE_NAMES, images):
      (root / 'images' / name).write_bytes(data)
    (root / 'labels.csv').write_bytes(csv_bytes)
    with _time_limit(20), bad_data.policy(skip=skip):
      try:
        examples = read_folder(root, split, label_columns=label_columns)
      except DataError as e:
        event(f'DataError: {str(e).split(": ")[1][:40] if ": " in str(e) else e}')
        return
    event(f'valid: {len(examples)} example(s)')
    _check_valid(examples, root, label_columns)


def test_fuzzer_reaches_both_outcomes():
  """The strategies are not degenerate: a valid table gives examples, garbage gives DataError."""
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    (root / 'images').mkdir()
    (root / 'images' / 'a.png').write_bytes(VALID[0])
    (root / 'labels.csv').write_bytes(b'filename,score\na.png,2.5\n')
    _check_valid(read_folder(root, label_columns=('score',)), root, ('score',))
    (root / 'images' / 'a.png').write_bytes(VALID[0][:30])
    with pytest.raises(DataError):
      read_folder(root)
