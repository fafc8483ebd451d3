"""Visual reports: small renderers to RGB uint8 images (PIL + NumPy, no matplotlib).

Each renderer returns an ``[H, W, 3]`` uint8 array; ``save`` writes it to
``<workdir>/reports/<name>.png`` and, given a clu metric writer, to TensorBoard.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

SIZE = 320
MARGIN = 40
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (160, 160, 160)
POINT = (31, 119, 180)
BAR_LABEL, BAR_ROW = 110, 12  # bar charts: name column width, row height
# Distinct colours for the 7 quality rows of the LQFR table (more curves would repeat them).
CURVES = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75), (227, 119, 194))


def to_uint8(image) -> np.ndarray:
  """HWC (or NHWC) image, uint8 or float in [0, 1] -> uint8."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def save(workdir: str, name: str, image, writer=None, step: int = 0) -> str:
  """Writes ``<workdir>/reports/<name>.png`` (and ``name`` to TensorBoard via ``writer``).

  Every process may call it (their writers only log); only process 0 writes the file.
  """
  import jax  # pylint: disable=g-import-not-at-top
  image = to_uint8(image)
  if jax.process_index() > 0:
    return ''
  path = os.path.join(workdir, 'reports', f'{name}.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)
  if writer is not None:
    writer.write_images(step, {f'reports/{name}': image[None]})
  return path


class _Axes:
  """A square plot area mapping data coordinates [lo, hi]^2 to pixels."""

  def __init__(self, lo, hi, title, xlabel, ylabel):
    self.img = Image.new('RGB', (SIZE + 2 * MARGIN, SIZE + 2 * MARGIN), WHITE)
    self.draw = ImageDraw.Draw(self.img)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
      lo, hi = lo - 0.5, hi + 0.5
    self.lo, self.hi = lo, hi
    d = self.draw
    d.rectangle([MARGIN, MARGIN, MARGIN + SIZE, MARGIN + SIZE], outline=BLACK)
    d.text((MARGIN, 8), title, fill=BLACK)
    d.text((MARGIN + SIZE // 2 - 3 * len(xlabel), MARGIN + SIZE + 20), xlabel, fill=BLACK)
    d.text((2, MARGIN - 14), ylabel, fill=BLACK)
    for v in (lo, hi):
      x, y = self.xy(v, v)
      d.text((x - 6, MARGIN + SIZE + 4), f'{v:.3g}', fill=BLACK)
      d.text((2, y - 5), f'{v:.3g}', fill=BLACK)

  def xy(self, x, y):
    """Data -> pixel coordinates (arrays or scalars)."""
    fx = (np.asarray(x, np.float64) - self.lo) / (self.hi - self.lo)
    fy = (np.asarray(y, np.float64) - self.lo) / (self.hi - self.lo)
    return MARGIN + fx * SIZE, MARGIN + (1 - fy) * SIZE

  def line(self, x, y, fill, width=1):
    px, py = self.xy(x, y)
    self.draw.line(list(zip(px.tolist(), py.tolist())), fill=fill, width=width)

  def array(self):
    return np.asarray(self.img)


def scatter(pred, true, title: str = '') -> np.ndarray:
  """Predicted (y) against true (x), with the y = x line."""
  pred, true = np.asarray(pred, np.float64).ravel(), np.asarray(true, np.float64).ravel()
  both = np.concatenate([pred, true])
  both = both[np.isfinite(both)]
  lo, hi = (both.min(), both.max()) if both.size else (0.0, 1.0)
  pad = 0.02 * (hi - lo)
  ax = _Axes(lo - pad, hi + pad, title, 'true', 'predicted')
  ax.line([ax.lo, ax.hi], [ax.lo, ax.hi], GREY)
  px, py = ax.xy(true, pred)
  for x, y in zip(px, py):
    if np.isfinite(x) and np.isfinite(y):
      ax.draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=POINT)
  return ax.array()


def confusion_counts(pred, true, num_classes: int) -> np.ndarray:
  """[true, pred] counts; labels outside [0, num_classes) (unknown, -1) are dropped."""
  pred, true = np.asarray(pred).ravel().astype(np.int64), np.asarray(true).ravel().astype(np.int64)
  ok = (pred >= 0) & (pred < num_classes) & (true >= 0) & (true < num_classes)
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (true[ok], pred[ok]), 1)
  return counts


def confusion_matrix_image(pred, true, class_names, title: str = '') -> np.ndarray:
  """Rows = true class, columns = predicted; cell brightness = row-normalised count."""
  k = len(class_names)
  counts = confusion_counts(pred, true, k)
  frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  cell = max(SIZE // k, 12)
  left, top = MARGIN + 60, MARGIN
  img = Image.new('RGB', (left + k * cell + MARGIN, top + k * cell + MARGIN + 20), WHITE)
  d = ImageDraw.Draw(img)
  d.text((left, 8), f'{title} (rows true, cols predicted)', fill=BLACK)
  for i in range(k):
    d.text((4, top + i * cell + cell // 2 - 5), str(class_names[i])[:9], fill=BLACK)
    d.text((left + i * cell + 2, top + k * cell + 4), str(class_names[i])[:max(cell // 6, 1)],
           fill=BLACK)
    for j in range(k):
      v = int(round(255 * frac[i, j]))
      x0, y0 = left + j * cell, top + i * cell
      d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(v, v, v))
      if cell >= 24:
        d.text((x0 + 3, y0 + 3), str(counts[i, j]), fill=(255, 0, 0))
  return np.asarray(img)


def roc_image(fpr, tpr, label='', title: str = 'ROC') -> np.ndarray:
  """ROC curve(s): ``fpr``/``tpr`` arrays, or lists of them with a list of labels."""
  if np.ndim(fpr[0]) == 0:
    fpr, tpr, label = [fpr], [tpr], [label]
  ax = _Axes(0.0, 1.0, title, 'false positive rate', 'true positive rate')
  ax.line([0, 1], [0, 1], GREY)
  for i, (f, t, name) in enumerate(zip(fpr, tpr, label)):
    colour = CURVES[i % len(CURVES)]
    ax.line(np.asarray(f), np.asarray(t), colour, width=2)
    ax.draw.text((MARGIN + SIZE // 2, MARGIN + SIZE - 14 * (len(label) - i) - 4), str(name),
                 fill=colour)
  return ax.array()


def bar_chart(values, names, title: str = '', lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  """One horizontal bar per name, from ``lo`` to its value (clipped to [lo, hi]), value printed."""
  values = np.asarray(values, np.float64).ravel()
  left, top, row = MARGIN + BAR_LABEL, MARGIN, BAR_ROW
  img = Image.new('RGB', (left + SIZE + MARGIN, top + len(values) * row + MARGIN), WHITE)
  d = ImageDraw.Draw(img)
  d.text((MARGIN, 8), title, fill=BLACK)
  d.text((left - 6, top - 14), f'{lo:.3g}', fill=BLACK)
  d.text((left + SIZE - 6, top - 14), f'{hi:.3g}', fill=BLACK)
  d.rectangle([left, top, left + SIZE, top + len(values) * row], outline=GREY)
  for i, (v, name) in enumerate(zip(values, names)):
    y0 = top + i * row
    d.text((4, y0), str(name)[:BAR_LABEL // 6], fill=BLACK)
    if np.isfinite(v):
      width = bar_pixels(v, lo, hi)
      if width:
        d.rectangle([left + 1, y0 + 2, left + width, y0 + row - 3], fill=POINT)
      d.text((left + width + 4, y0), f'{v:.3f}', fill=BLACK)
  return np.asarray(img)


def bar_pixels(value: float, lo: float, hi: float) -> int:
  """The length in pixels of ``value``'s bar."""
  return int(round(SIZE * (np.clip(value, lo, hi) - lo) / (hi - lo)))


def reconstruction_grid(out, patch: int, norm_pix: bool) -> np.ndarray:
  """MAE outputs -> [B, H, 3W, 3] in [0, 1]: masked input | prediction | original per face.

  ``out`` holds ``pred``, ``target`` (patches in [-1, 1]) and ``mask`` (1 = masked).
  """
  from faceflax.models import mae  # pylint: disable=g-import-not-at-top
  pred, target, mask = (np.asarray(out[k], np.float32) for k in ('pred', 'target', 'mask'))
  if norm_pix:  # undo the per-patch normalisation with the true patch statistics
    mu, sd = target.mean(-1, keepdims=True), np.sqrt(target.var(-1, keepdims=True) + 1e-6)
    pred = pred * sd + mu
  m = mask[..., None]
  rows = [target * (1 - m), pred * m + target * (1 - m), target]
  imgs = [np.asarray(mae.unpatchify(r, patch)) for r in rows]
  grid = np.concatenate(imgs, axis=2)
  return np.clip((grid + 1) / 2, 0, 1)


def _heat(m):
  """[..., H, W] in [0, 1] -> [..., H, W, 3] blue -> red."""
  m = np.clip(m, 0, 1)[..., None]
  return np.concatenate([m, 1 - np.abs(2 * m - 1), 1 - m], -1)


def attention_overlay(faces, maps, alpha: float = 0.5) -> np.ndarray:
  """Faces ``[N, H, W, 3]`` (uint8, [0, 1] or [-1, 1]) | faces with each map as a heat overlay.

  ``maps`` is ``[N, h, w]`` (or ``[N, h, w, 1]``), or a list of such (one overlay column
  each, e.g. one per network stage), upsampled (nearest) to the face size and min-max
  normalised per face. Returns one row per face: the face and its overlays side by side.
  """
  if isinstance(maps, (list, tuple)):
    columns = [attention_overlay(faces, m, alpha) for m in maps]
    w = columns[0].shape[1] // 2
    return np.concatenate([columns[0][:, :w]] + [c[:, w:] for c in columns], axis=1)
  faces = np.asarray(faces)
  faces = faces / 255.0 if faces.dtype == np.uint8 else np.asarray(faces, np.float64)
  if faces.min() < 0:
    faces = (faces + 1) / 2
  faces = np.clip(faces, 0, 1)
  maps = np.asarray(maps, np.float64)
  if maps.ndim == 4:
    maps = maps.mean(-1)
  n, h, w = faces.shape[:3]
  rows = np.arange(h) * maps.shape[1] // h
  cols = np.arange(w) * maps.shape[2] // w
  up = maps[:, rows][:, :, cols]
  lo, hi = up.min((1, 2), keepdims=True), up.max((1, 2), keepdims=True)
  up = (up - lo) / np.maximum(hi - lo, 1e-12)
  over = (1 - alpha) * faces + alpha * _heat(up)
  grid = np.concatenate([faces, over], axis=2).reshape(n * h, 2 * w, 3)
  return to_uint8(grid)


def probe_batch(images, pp: str, cache_pp: str, n: int = 4, labels=None) -> dict:
  """The first ``n`` examples of ``images`` (paths or records; and ``labels``) as evaluation
  batches them."""
  from faceflax.data import pipeline  # pylint: disable=g-import-not-at-top
  images = pipeline.head(images, n)
  labels = {k: np.asarray(v)[:n] for k, v in (labels or {}).items()}
  return next(iter(pipeline.make_eval_dataset(images, labels, batch_size=len(images), pp=pp,
                                              cache_pp=cache_pp)))


def probe_faces(paths, pp: str, cache_pp: str, n: int = 4) -> np.ndarray:
  """The first ``n`` images of ``paths`` as the model sees them in evaluation ([n, H, W, 3])."""
  return np.asarray(probe_batch(paths, pp, cache_pp, n)['image'])


def save_attention(workdir: str, name: str, maps_of, images, config, writer=None) -> None:
  """``maps_of(faces)`` (a tuple of [N, h, w] attention maps, one per network stage) over the
  first faces of ``images`` as evaluation sees them -> ``reports/<name>.png``, one overlay
  column per map; nothing when the model has no attention maps."""
  from faceflax.data import pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow
  faces = probe_faces(images, config.data.eval_pp, pipeline.cache_pp(config))
  maps = maps_of(faces)
  if maps:
    save(workdir, name, attention_overlay(faces, [np.asarray(m, np.float32) for m in maps]),
         writer)
