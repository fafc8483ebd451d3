"""Up-front image checks: every file must exist, be a supported image and decode as the pipeline decodes it.

tf.data reports a bad image deep inside the pipeline without its file name, so
readers check all their images before training starts (``screen``). Each file is
checked once per process: results are cached by (path, size, mtime, inode).
"""
import concurrent.futures
import io
import os
import stat
import threading
import warnings

import numpy as np
from PIL import Image
from etils import epy

with epy.lazy_imports():  # TensorFlow loads at first use: building or timing a step needs none
  import tensorflow as tf

from faceflax import progress
from faceflax.data import bad_data, ops
from faceflax.data.errors import DataError

FORMATS = ('JPEG', 'PNG', 'BMP', 'GIF', 'WEBP')  # What tf.io.decode_image reads.
MAX_PIXELS = 8192 * 8192  # Larger headers are refused before decoding (decompression bombs).
_GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')
_THREADS = 4

_cache: dict = {}
_cache_lock = threading.Lock()


def _inspect_bytes(data: bytes) -> tuple[str | None, bool]:
  """(what is wrong or None, is greyscale) of encoded image bytes."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(io.BytesIO(data)) as image:
        fmt, mode, (width, height) = image.format, image.mode, image.size
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types.
    return f'not an image: {type(e).__name__}: {e}', False
  if fmt not in FORMATS:
    return f'unsupported format {fmt} (readable: {", ".join(FORMATS)})', False
  if width * height > MAX_PIXELS:
    return f'{width}x{height} pixels, more than the {MAX_PIXELS} allowed', False
  try:
    ops.decode_rgb(tf.constant(data))
  except (tf.errors.OpError, ValueError) as e:
    message = getattr(e, 'message', str(e)).strip().splitlines()
    return f'does not decode: {message[0] if message else type(e).__name__}', False
  return None, mode in _GREY_MODES


def bytes_problem(data: bytes) -> str | None:
  """What is wrong with encoded image bytes (a record of a store), or None."""
  return _inspect_bytes(data)[0]


def _problem(path) -> tuple[str | None, bool]:
  """(what is wrong or None, is greyscale) of a regular file, uncached."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return f'unreadable: {e}', False
  return _inspect_bytes(data)


def inspect(path) -> tuple[str | None, bool]:
  """(what is wrong or None, is greyscale) of one image file, cached while the file is unchanged."""
  path = str(path)
  try:
    st = os.stat(path)
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name.
    return ('missing' if isinstance(e, FileNotFoundError) else f'unreadable: {e}'), False
  if not stat.S_ISREG(st.st_mode):
    return 'not a regular file', False
  key = (st.st_size, st.st_mtime_ns, st.st_ino)
  with _cache_lock:
    hit = _cache.get(path)
  if hit is not None and hit[0] == key:
    return hit[1]
  result = _problem(path)
  with _cache_lock:
    _cache[path] = (key, result)
  return result


def screen(paths, where: str, *, skippable: bool = True, colour_set: bool = True) -> np.ndarray:
  """Keep-mask over ``paths``: missing, unreadable and undecodable files are bad examples.

  ``colour_set``: ``paths`` are one dataset. If some of its images are colour,
  its greyscale images are bad too (a grey face among colour ones is a broken
  file, not a style); an all-grey dataset (FER2013) is replicated to RGB.
  Bad examples raise a DataError naming them unless ``bad_data`` skips them.
  """
  paths = [str(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    results = list(progress.logged(pool.map(inspect, paths), f'{where}: screening images',
                                   len(paths)))
  whys = [why for why, _ in results]
  keep = bad_data.screen(where, 'image file(s) missing', paths,
                         ['' if why == 'missing' else None for why in whys], skippable=skippable)
  keep &= bad_data.screen(where, 'unreadable image(s)', paths,
                          [None if why in (None, 'missing') else why for why in whys],
                          skippable=skippable)
  grey = np.asarray([g for _, g in results], bool) & keep
  if colour_set and grey.any() and (keep & ~grey).any():
    keep &= bad_data.screen(where, 'greyscale image(s) among colour images', paths,
                            ['greyscale' if g else None for g in grey], skippable=skippable)
  if paths and not keep.any():  # each check skipped some: nothing left to train or score on
    raise DataError(f'{where}: all {len(paths)} images are bad (skipped), none left')
  return keep
