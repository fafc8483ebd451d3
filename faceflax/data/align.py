"""Face detection and alignment of raw photos to the framing of a dataset's face chips.

Detection uses the Haar cascades bundled in the ``opencv-python-headless`` wheel
(frontal face, then eyes inside the face): nothing is downloaded at run time.
Each photo gives a 112 px chip framed like the chips the models were trained on:

* both eyes found: the similarity transform (rotation, scale, shift) that puts the
  eye centres on the dataset's template eyes (``EYE_TEMPLATES``);
* otherwise: the face box placed where that dataset's chips hold it. The relation
  between the Haar box and the eye centres was measured on ~430 chips of
  SCUT-FBP5500, UTKFace and CelebA (the same within +-0.01 on all three): the box
  is ``BOX_WIDTH`` eye distances wide and centred ``BOX_BELOW_EYES`` eye distances
  below the eyes' midpoint.

Several faces: the largest is aligned and ``faces`` counts the detections at
least ``SAME_SIZE`` times its width (smaller ones are background faces or false
detections). Aligning a dataset chip with its own template gives the chip back
(``tests/test_predict.py``).
"""
import dataclasses
import os

import numpy as np

from faceflax.data import face_regions, records

CHIP_SIZE = 112  # the side of the shared datasets' chips (and of the ArcFace template)
BOX_WIDTH = 2.62        # Haar face box width / eye distance
BOX_BELOW_EYES = 0.33   # (box centre y - eye midpoint y) / eye distance
SAME_SIZE = 0.5         # a detection counts as a face when >= this x the largest's width
# Eye centres (fractions of the chip side, image-left eye first) per dataset folder name.
# SCUT-FBP5500: the mean pupils (landmarks 58, 59) over its 3300 rows; the others are
# the first two points of face_regions.CHIP_TEMPLATES. Other datasets: 'arcface'.
EYE_TEMPLATES = {name: np.asarray(t[:2], np.float64)
                 for name, t in face_regions.CHIP_TEMPLATES.items()}
EYE_TEMPLATES['scut_fbp5500'] = np.array([[42.3, 50.1], [70.3, 49.9]]) / 112
ALIGN_MODES = ('auto', 'none')

# Detection works on a copy whose shorter side is at least _MIN_SIDE (chips are
# upscaled) and whose longer side is at most _MAX_SIDE (large photos are shrunk),
# padded by _PAD of its shorter side: a tightly cropped chip needs the margin.
_MIN_SIDE, _MAX_SIDE, _PAD = 250, 800, 0.25


def folder_name(dataset: str) -> str:
  """A dataset's folder name (a path or a name; '' for none): what picks its template.
  A record store is named by the dataset it was made from."""
  if dataset and records.is_store(dataset):
    return records.source_name(dataset)
  return os.path.basename(os.path.normpath(dataset)) if dataset else ''


def template_for(dataset: str) -> np.ndarray:
  """The eye template of a dataset folder (a path or a name); 'arcface' for unknown ones."""
  return EYE_TEMPLATES.get(folder_name(dataset), EYE_TEMPLATES['arcface'])


def template_name(dataset: str) -> str:
  name = folder_name(dataset)
  return name if name in EYE_TEMPLATES else 'arcface'


@dataclasses.dataclass(frozen=True)
class Detection:
  """The faces found in one photo; ``eyes`` and ``box`` (x, y, w, h) in photo pixels."""
  status: str                    # 'ok', 'several_faces' or 'no_face'
  faces: int                     # detections at least SAME_SIZE x the largest one's width
  method: str = ''               # 'eyes' (both eyes found) or 'box' (placed by the face box)
  eyes: np.ndarray | None = None  # [2, 2] image-left then image-right eye of the largest face
  box: tuple = ()


class Detector:
  """OpenCV's bundled frontal-face and eye cascades (loaded once)."""

  def __init__(self):
    import cv2  # pylint: disable=g-import-not-at-top  # only predict / verify need OpenCV
    self.cv2 = cv2
    cv2.setNumThreads(1)
    root = cv2.data.haarcascades
    self.face = cv2.CascadeClassifier(os.path.join(root, 'haarcascade_frontalface_default.xml'))
    self.eye = cv2.CascadeClassifier(os.path.join(root, 'haarcascade_eye.xml'))
    if self.face.empty() or self.eye.empty():
      raise RuntimeError(f'OpenCV\'s Haar cascades are missing from {root}: install '
                         'opencv-python-headless 4.x (requirements.txt; 5.x has none)')

  def faces(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(boxes [F, 4] x, y, w, h in the padded work image, its grey pixels, scale, pad)."""
    cv2 = self.cv2
    h, w = rgb.shape[:2]
    scale = min(_MAX_SIDE / max(h, w), max(1.0, _MIN_SIDE / min(h, w)))
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if scale != 1.0:
      grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))),
                        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    pad = int(_PAD * min(grey.shape))
    grey = cv2.equalizeHist(cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REPLICATE))
    side = max(24, int(0.05 * min(grey.shape)))
    boxes = self.face.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5,
                                       minSize=(side, side))
    return np.asarray(boxes, np.float64).reshape(-1, 4), grey, scale, pad

  def eyes(self, grey: np.ndarray, box) -> np.ndarray | None:
    """Image-left and image-right eye centres [2, 2] inside ``box``, or None.

    Candidates come from the upper 60% of the box; on each side of its middle the
    one nearest to where the box puts that eye is kept. A pair whose distance or
    tilt is implausible for that box is refused.
    """
    x, y, w, h = box
    roi = grey[int(y):int(y + 0.6 * h), int(x):int(x + w)]
    lo, hi = max(8, int(0.1 * w)), max(9, int(0.4 * w))
    found = self.eye.detectMultiScale(roi, scaleFactor=1.1, minNeighbors=3, minSize=(lo, lo),
                                      maxSize=(hi, hi))
    centres = [(x + ex + ew / 2, y + ey + eh / 2) for ex, ey, ew, eh in
               np.asarray(found, np.float64).reshape(-1, 4)]
    expected = eyes_from_box(box)
    pair = []
    for side, want in zip((lambda c: c[0] < x + w / 2, lambda c: c[0] >= x + w / 2), expected):
      candidates = [c for c in centres if side(c)]
      if not candidates:
        return None
      pair.append(min(candidates, key=lambda c, t=want: np.hypot(c[0] - t[0], c[1] - t[1])))
    pair = np.asarray(pair)
    d = pair[1] - pair[0]
    distance, tilt = np.hypot(*d), np.degrees(np.arctan2(d[1], d[0]))
    if not (0.25 * w <= distance <= 0.6 * w and abs(tilt) <= 25):
      return None
    return pair


def eyes_from_box(box) -> np.ndarray:
  """Eye centres [2, 2] implied by a Haar face box (the measured BOX_* relation)."""
  x, y, w, h = box
  d = w / BOX_WIDTH
  cx, cy = x + w / 2, y + h / 2 - BOX_BELOW_EYES * d
  return np.array([[cx - d / 2, cy], [cx + d / 2, cy]])


def similarity(src, dst) -> np.ndarray:
  """2x3 matrix of the rotation + uniform scale + shift taking points src[0:2] to dst[0:2]."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  a, b = src[1] - src[0], dst[1] - dst[0]
  za, zb = complex(*a), complex(*b)
  r = zb / za  # rotation and scale as one complex factor
  m = np.array([[r.real, -r.imag], [r.imag, r.real]])
  return np.concatenate([m, (dst[0] - m @ src[0])[:, None]], axis=1)


def warp(cv2, rgb: np.ndarray, eyes, template, size: int) -> np.ndarray:
  """The ``size`` px chip whose eye centres are ``template`` * size."""
  eyes = np.asarray(eyes, np.float64)
  matrix = similarity(eyes, np.asarray(template) * size)
  shrink = np.sqrt(abs(np.linalg.det(matrix[:, :2])))
  if shrink < 0.5:  # shrink with area averaging first: bilinear sampling alone would alias
    f = 2 * shrink
    h, w = rgb.shape[:2]
    rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))),
                     interpolation=cv2.INTER_AREA)
    matrix = similarity(eyes * f, np.asarray(template) * size)
  return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)


def detect(detector: Detector, rgb: np.ndarray) -> Detection:
  """Finds the faces of an RGB uint8 photo and the eye centres of the largest."""
  boxes, grey, scale, pad = detector.faces(rgb)
  if not len(boxes):
    return Detection('no_face', 0)
  widths = boxes[:, 2]
  largest = boxes[int(np.argmax(widths))]
  faces = int(np.sum(widths >= SAME_SIZE * widths.max()))
  eyes = detector.eyes(grey, largest)
  method = 'eyes' if eyes is not None else 'box'
  if eyes is None:
    eyes = eyes_from_box(largest)
  x, y = (largest[:2] - pad) / scale
  return Detection('ok' if faces == 1 else 'several_faces', faces, method, (eyes - pad) / scale,
                   (float(x), float(y), float(largest[2] / scale), float(largest[3] / scale)))


def align(detector: Detector, rgb: np.ndarray, template, size: int = CHIP_SIZE
          ) -> tuple[Detection, np.ndarray | None]:
  """(the detection, the ``size`` px chip of its largest face aligned to ``template`` or None)."""
  found = detect(detector, rgb)
  if found.eyes is None:
    return found, None
  return found, warp(detector.cv2, rgb, found.eyes, template, size)
