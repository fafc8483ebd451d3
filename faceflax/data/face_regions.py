"""Face-structure targets: ellipse shapes per face, region maps and patch labels.

Every face is described by NUM_SHAPES ellipses, one row each of a float32
[S, 6] array (region_id, cx, cy, ax, ay, angle) in the order of SHAPES.
Coordinates are fractions of the image width (x) and height (y), so they stay
valid under any resize; (ax, ay) are the semi-axes along the ellipse's own axes
and `angle` (radians, in [-pi/4, pi/4)) turns its x axis towards +y (image y
points down). Left/right mean image-left/right, and both sides share a region
id, so a horizontal flip keeps the targets correct.

Rasterising paints every ellipse with its region, the highest region id wins
(REGIONS is in priority order), and a face outline (a 'skin' row) also paints
the band inside its border, `contour_width` of the image side wide, as
'contour': the ring between the outline and a copy with both semi-axes
shortened by `contour_width`. Each pixel gets exactly one region.

The 'face_regions' preprocessing op rasterises features['face_shapes'] at the
current image size into features['regions'] [H, W, R]; put it before any
geometric op, which then moves the map with the image.
"""

import io
import os
import types
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from etils import epy

with epy.lazy_imports():  # TensorFlow loads at first use: building or timing a step needs none
  import tensorflow as tf

from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, load_array, read_folder
from faceflax.data.ops import register

REGIONS = ('background', 'skin', 'contour', 'brows', 'eyes', 'nose', 'mouth')
COMPONENTS = ('contour', 'brows', 'eyes', 'nose', 'mouth')
COMPONENT_IDS = tuple(REGIONS.index(c) for c in COMPONENTS)  # Channels of COMPONENTS.
SKIN, CONTOUR = REGIONS.index('skin'), REGIONS.index('contour')
CONTOUR_WIDTH = 0.06  # Fraction of the image side.

SHAPES = ('face', 'left_brow', 'right_brow', 'left_eye', 'right_eye', 'nose', 'mouth')
NUM_SHAPES = len(SHAPES)
SHAPE_REGIONS = tuple(REGIONS.index(r) for r in (
    'skin', 'brows', 'brows', 'eyes', 'eyes', 'nose', 'mouth'))

# SCUT-FBP5500's 86 points, checked by drawing them on faces: the outline
# starts at the top of the forehead and runs down the image-left side to the
# chin (11) and back up; 58/59 are the pupils (unused: the eye rings hold them).
LANDMARKS86_GROUPS = (range(0, 22), range(22, 32), range(32, 42), range(42, 50),
                      range(50, 58), range(60, 73), range(73, 86))
MARGIN = 0.1  # Components grow by 10% to cover lashes and lip borders.

# 5 points (eyes, nose tip, mouth corners) of the ArcFace/insightface 112x112
# chip, as fractions of the side.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]], np.float32) / 112
# The chips in ../shared/data are NOT ArcFace-aligned: their faces sit higher
# and larger. These 5 points were read off the mean of ~800 chips (+-2 px of 112).
CHIP_TEMPLATES = {
    'arcface': ARCFACE_TEMPLATE,
    'utkface': np.array([[33, 32], [77, 32], [55, 60], [36, 77], [74, 77]],
                        np.float32) / 112,
    'celeba_id': np.array([[34.5, 33], [76.5, 33], [55.5, 60], [40, 76], [71, 76]],
                          np.float32) / 112,
}


def fit_ellipses(points, margin=0.0, min_axis=0.0):
  """Ellipses [..., 5] (cx, cy, ax, ay, angle) around point groups [..., P, 2].

  The axes are the principal axes of the points; the ellipse passes through
  their extremes along those axes (the centre is the middle of the extent, not
  the mean, which uneven point spacing would bias), semi-axes times 1 + margin
  and at least `min_axis` so a closed eye keeps some height.
  """
  points = np.asarray(points, np.float64)
  mean = points.mean(-2, keepdims=True)
  d = points - mean
  _, vectors = np.linalg.eigh(np.einsum('...pi,...pj->...ij', d, d))
  major = vectors[..., -1]
  # Both axes are principal, so the one nearest to image x becomes ax.
  angle = (np.arctan2(major[..., 1], major[..., 0]) + np.pi / 4) % (np.pi / 2) - np.pi / 4
  c, s = np.cos(angle), np.sin(angle)
  u = d[..., 0] * c[..., None] + d[..., 1] * s[..., None]
  v = d[..., 1] * c[..., None] - d[..., 0] * s[..., None]
  mid_u, mid_v = (u.max(-1) + u.min(-1)) / 2, (v.max(-1) + v.min(-1)) / 2
  cx = mean[..., 0, 0] + mid_u * c - mid_v * s
  cy = mean[..., 0, 1] + mid_u * s + mid_v * c
  ax = np.maximum((u.max(-1) - u.min(-1)) / 2 * (1 + margin), min_axis)
  ay = np.maximum((v.max(-1) - v.min(-1)) / 2 * (1 + margin), min_axis)
  return np.stack([cx, cy, ax, ay, angle], -1)


def _with_regions(ellipses):
  """[..., S, 5] ellipses -> [..., S, 6] float32 shapes with SHAPE_REGIONS first."""
  ids = np.broadcast_to(np.asarray(SHAPE_REGIONS, np.float64)[:, None],
                        ellipses.shape[:-1] + (1,))
  return np.concatenate([ids, ellipses], -1).astype(np.float32)


def shapes_from_landmarks86(landmarks, image_size):
  """SCUT-FBP5500 86-point landmarks [..., 86, 2] (pixels, x then y) -> shapes [..., S, 6].

  Each shape is `fit_ellipses` of its LANDMARKS86_GROUPS points, in fractions
  of the square `image_size`; the outline is fitted as is, components grow by
  MARGIN, and every semi-axis is at least one pixel.
  """
  points = np.asarray(landmarks, np.float64) / image_size
  if points.shape[-2:] != (86, 2):
    raise ValueError(f'expected landmarks [..., 86, 2], got {points.shape}')
  ellipses = [fit_ellipses(points[..., list(group), :], 0.0 if i == 0 else MARGIN,
                           1.0 / image_size)
              for i, group in enumerate(LANDMARKS86_GROUPS)]
  return _with_regions(np.stack(ellipses, -2))


def is_plausible(shapes):
  """[..., S, 6] -> [...] bool: brows above eyes above nose above mouth, left left of right.

  Catches scrambled landmarks (3 SCUT-FBP5500 training rows have points of one
  part listed under another).
  """
  _, x, y = np.moveaxis(np.asarray(shapes)[..., :3], -1, 0)
  _, brow_l, brow_r, eye_l, eye_r, nose, mouth = range(NUM_SHAPES)
  return ((y[..., brow_l] < y[..., eye_l]) & (y[..., brow_r] < y[..., eye_r]) &
          (np.maximum(y[..., eye_l], y[..., eye_r]) < y[..., nose]) &
          (y[..., nose] < y[..., mouth]) &
          (x[..., brow_l] < x[..., brow_r]) & (x[..., eye_l] < x[..., eye_r]))


def shapes_from_template(template=ARCFACE_TEMPLATE):
  """Shapes [S, 6] placed by fixed proportions around 5 points [5, 2] (fractions).

  In the face frame (origin at the eyes' midpoint, x along the eye line), with
  d = inter-ocular distance and m = eyes-to-mouth distance (from the medians
  of the SCUT-FBP5500 landmark fits, in those units):
    eyes:  at the eye points, semi-axes (0.21 d, 0.085 m), inner corners down 0.1 rad;
    brows: eye point + (0.07 d outwards, -0.28 m), semi-axes (0.29 d, 0.077 m),
           inner ends down 0.06 rad;
    nose:  (nose tip x, 0.39 m), semi-axes (0.32 d, 0.38 m);
    mouth: mouth corners' midpoint + (0, 0.07 m), semi-axes (half the corner
           distance, 0.145 m);
    face:  (0, 0.27 m), semi-axes (1.11 d, 1.40 m).
  Components then grow by MARGIN like the landmark fits. On an ArcFace chip the
  face outline reaches past the bottom edge: those chips cut the chin.
  """
  eye_l, eye_r, nose, mouth_l, mouth_r = np.asarray(template, np.float64)
  origin = (eye_l + eye_r) / 2
  d = np.linalg.norm(eye_r - eye_l)
  ex = (eye_r - eye_l) / d
  ey = np.array([-ex[1], ex[0]])
  m = ((mouth_l + mouth_r) / 2 - origin) @ ey
  roll = np.arctan2(ex[1], ex[0])

  def at(x, y):  # Face frame -> image fractions.
    return origin + x * ex + y * ey

  mouth_mid = ((mouth_l + mouth_r) / 2 - origin) @ ex
  rows = [  # (centre, ax, ay, angle in the face frame, grows by MARGIN)
      (at(0.0, 0.27 * m), 1.11 * d, 1.40 * m, 0.0, False),
      (eye_l + at(-0.07 * d, -0.28 * m) - origin, 0.29 * d, 0.077 * m, 0.06, True),
      (eye_r + at(0.07 * d, -0.28 * m) - origin, 0.29 * d, 0.077 * m, -0.06, True),
      (eye_l, 0.21 * d, 0.085 * m, 0.1, True),
      (eye_r, 0.21 * d, 0.085 * m, -0.1, True),
      (at((nose - origin) @ ex, 0.39 * m), 0.32 * d, 0.38 * m, 0.0, True),
      (at(mouth_mid, 1.07 * m), np.linalg.norm(mouth_r - mouth_l) / 2, 0.145 * m, 0.0, True),
  ]
  ellipses = [(*centre, ax * (1 + MARGIN * grow), ay * (1 + MARGIN * grow), angle + roll)
              for centre, ax, ay, angle, grow in rows]
  return _with_regions(np.asarray(ellipses))


def _square_side(name, data: bytes) -> int:
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
  if width != height:
    raise DataError(f'{name}: landmarks need square images or an explicit image_size, '
                    f'got {width}x{height}')
  return width


def _usable_shapes(landmarks, has_landmarks, image_size, where) -> np.ndarray:
  """Shapes [N, S, 6] of every row's 86 landmarks, NaN where unusable."""
  landmarks = np.asarray(landmarks, np.float64)
  if landmarks.shape[1:] != (86, 2):
    raise DataError(f'{where}: expected [rows, 86, 2] landmarks, got {landmarks.shape}')
  valid = np.isfinite(landmarks).all((1, 2)) & np.abs(landmarks).any((1, 2))
  if has_landmarks is not None:
    valid &= np.asarray(has_landmarks) != 0
  shapes = shapes_from_landmarks86(np.where(valid[:, None, None], landmarks, 0), image_size)
  valid &= is_plausible(shapes)
  return np.where(valid[:, None, None], shapes, np.nan)


def _landmark_rows(data_dir, image_size):
  """(real image path -> labels.csv row, shapes [N, S, 6], NaN where unusable)."""
  everything = read_folder(data_dir, check_files=False)
  path = Path(data_dir) / 'landmarks86.npy'
  landmarks = load_array(path)
  if len(landmarks) != len(everything):
    raise DataError(f'{path}: {len(landmarks)} landmark rows but labels.csv has '
                    f'{len(everything)} rows')
  if image_size is None:
    image_size = _square_side(everything.paths[0], Path(everything.paths[0]).read_bytes())
  shapes = _usable_shapes(landmarks, everything.labels.get('has_landmarks'), image_size, path)
  index = {os.path.realpath(p): i for i, p in enumerate(everything.paths)}
  return index, shapes


def _store_shapes(examples: Examples, template, image_size) -> np.ndarray:
  """``load_face_shapes`` of a record store's examples: its 'landmarks86' column (written by
  ``prepare`` from the folder's landmarks86.npy), rows by store index."""
  store = examples.store
  if 'landmarks86' not in store.manifest['columns']:
    return np.tile(shapes_from_template(template), (len(examples), 1, 1))
  if image_size is None:
    image_size = _square_side(store.describe(0), store.read([0])[0])
  has = store.column('has_landmarks') if 'has_landmarks' in store.column_names else None
  shapes = _usable_shapes(store.column('landmarks86'), has, image_size,
                          f'{store.root} column landmarks86')
  return _with_fallback(shapes, shapes[examples.rows], template)


def _with_fallback(shapes, picked, template) -> np.ndarray:
  """``picked`` rows of ``shapes`` with unusable ones replaced by the dataset's median."""
  usable = ~np.isnan(shapes).any(axis=(1, 2))
  fallback = (np.median(shapes[usable], axis=0) if usable.any()
              else shapes_from_template(template))
  return np.where(np.isnan(picked), fallback, picked).astype(np.float32)


def load_face_shapes(data_dir, examples: Examples, template=ARCFACE_TEMPLATE,
                     image_size=None):
  """Shapes [len(examples), S, 6] of a folder-format dataset's (or record store's) examples.

  Rows come from `<data_dir>/landmarks86.npy` when it exists (matched to
  labels.csv rows by image path, since `examples` may be a split; a store
  prepared from such a folder holds them as its 'landmarks86' column); rows without
  usable landmarks (has_landmarks=0, all zero, non-finite or not `is_plausible`)
  get the dataset's median landmark shapes (its own framing of the face), and
  datasets without the file get `shapes_from_template(template)`.
  `image_size` is the side of the landmarks' pixel frame; by default that of
  the first image, which must be square.
  """
  if examples.store is not None:
    return _store_shapes(examples, template, image_size)
  if not (Path(data_dir) / 'landmarks86.npy').is_file():
    return np.tile(shapes_from_template(template), (len(examples), 1, 1))
  index, shapes = _landmark_rows(data_dir, image_size)
  rows = [index.get(os.path.realpath(p)) for p in examples.paths]
  missing = [p for p, row in zip(examples.paths, rows) if row is None]
  if missing:
    raise DataError(f'{Path(data_dir) / "labels.csv"}: {len(missing)} example(s) not '
                    f'listed, e.g. {missing[0]}')
  return _with_fallback(shapes, shapes[np.asarray(rows, np.int64).reshape(-1)], template)


def _pixel_labels(shapes, height, width, contour_width, xp):
  """Region id [H, W] of each pixel; `xp` is numpy or a tf namespace shim."""
  shapes = xp.cast(shapes, xp.float32)
  ys = (xp.cast(xp.arange(height), xp.float32) + 0.5) / xp.cast(height, xp.float32)
  xs = (xp.cast(xp.arange(width), xp.float32) + 0.5) / xp.cast(width, xp.float32)
  region, cx, cy, ax, ay, angle = [shapes[:, i, None, None] for i in range(6)]
  cos, sin = xp.cos(angle), xp.sin(angle)
  dx, dy = xs[None, None, :] - cx, ys[None, :, None] - cy
  u, v = dx * cos + dy * sin, dy * cos - dx * sin

  def inside(ax, ay):  # (u/ax)^2 + (v/ay)^2 <= 1 without dividing by zero axes.
    return (xp.square(u * ay) + xp.square(v * ax) <= xp.square(ax * ay)) & (ax > 0) & (ay > 0)

  region = xp.cast(xp.round(region), xp.int32)
  core = inside(ax - contour_width, ay - contour_width)
  band = (region == SKIN) & xp.logical_not(core)
  labels = xp.where(inside(ax, ay), xp.where(band, CONTOUR, region), 0)
  return xp.reduce_max(labels, 0)


class _NumpyOps:
  """The few tf names `_pixel_labels` uses, on numpy arrays."""
  float32, int32 = np.float32, np.int32
  arange, cos, sin, square, round, where = np.arange, np.cos, np.sin, np.square, np.round, np.where
  logical_not = np.logical_not

  @staticmethod
  def cast(x, dtype):
    return np.asarray(x).astype(dtype)

  @staticmethod
  def reduce_max(x, axis):
    return x.max(axis, initial=0)


def _tf_ops():
  """The same names in tf, for the op (looked up when the op is built: TensorFlow loads lazily)."""
  return types.SimpleNamespace(
      float32=tf.float32, int32=tf.int32, arange=tf.range, cos=tf.cos, sin=tf.sin,
      square=tf.square, round=tf.round, where=tf.where, logical_not=tf.logical_not,
      cast=tf.cast, reduce_max=tf.reduce_max)


def region_map_np(shapes, size, contour_width=CONTOUR_WIDTH):
  """One-hot region map [H, W, R] float32 of shapes [S, 6]; `size` is H=W or (H, W).

  The reference for the 'face_regions' op: pixel (i, j) is tested at its
  centre ((j + 0.5) / W, (i + 0.5) / H).
  """
  height, width = (size, size) if np.isscalar(size) else size
  shapes = np.asarray(shapes, np.float32).reshape(-1, 6)
  ids = np.round(shapes[:, 0])
  if ((ids < 0) | (ids >= len(REGIONS))).any():
    raise ValueError(f'region ids must be in [0, {len(REGIONS)}), got {shapes[:, 0]}')
  labels = _pixel_labels(shapes, height, width, np.float32(contour_width), _NumpyOps)
  return np.eye(len(REGIONS), dtype=np.float32)[labels]


@register('face_regions')
def get_face_regions(contour_width=CONTOUR_WIDTH):
  """Writes features['regions'] [H, W, R] float32 from features['face_shapes'] [S, 6]."""
  def face_regions(features):
    image = features['image']
    size = tf.shape(image)
    labels = _pixel_labels(tf.reshape(features['face_shapes'], [-1, 6]), size[0], size[1],
                           tf.constant(contour_width, tf.float32), _tf_ops())
    features['regions'] = tf.ensure_shape(
        tf.one_hot(labels, len(REGIONS), dtype=tf.float32),
        image.shape[:2].concatenate([len(REGIONS)]))
    return features
  return face_regions


def patch_fractions(regions: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, R] maps -> [B, N, R] mean of each region per patch, patches row-major."""
  return einops.reduce(regions, 'b (h p) (w q) r -> b (h w) r', 'mean', p=patch, q=patch)


def component_membership(fractions: jax.Array, threshold: float = 0.25) -> jax.Array:
  """[B, N, R] fractions -> [B, N, C] bool: component c covers >= threshold of the patch."""
  return fractions[..., jnp.asarray(COMPONENT_IDS)] >= threshold
