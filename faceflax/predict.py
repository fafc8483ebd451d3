"""Scoring new photos with a trained model (``--mode=predict``), shared by the tasks.

A task builds one ``Head`` per alignment it needs (its model's forward pass and the
framing of its training chips) and calls ``run``; this module lists the inputs,
decodes, detects and aligns each photo (``--align=auto``) or takes it as it is
(``--align=none``: already aligned chips, decoded and resized exactly as the
evaluation pipeline does), batches the faces, and writes one CSV row per input file:

  file, status, faces, alignment, <the heads' 1-D outputs>, note

status: ``ok``; ``several_faces`` (scored on the largest face); ``no_face``;
``corrupt`` (not an image, truncated, unreadable: ``note`` says why). A head's 2-D
outputs (embeddings) go to ``<output stem>_<name>.npy``, one row per CSV row
(NaN where the file has no face).
"""
import csv
import dataclasses
import os
from typing import Callable

import numpy as np
from etils import epy

with epy.lazy_imports():  # TensorFlow loads at first use: building or timing a step needs none
  import tensorflow as tf
from absl import logging
from PIL import Image, ImageOps

from faceflax import progress as progress_lib
from faceflax.data import align as align_lib, images, ops, sources
from faceflax.data.errors import DataError
from faceflax.train import files, mesh as mesh_lib

EXTENSIONS = sources.IMAGE_EXTENSIONS + ('.webp', '.gif')
SCORED = ('ok', 'several_faces')  # statuses whose row holds predictions


@dataclasses.dataclass(frozen=True)
class Head:
  """One forward pass over aligned faces.

  ``forward(images)`` gets a batch sharded over the mesh ([batch_size, image_size,
  image_size, 3] after ``pp``) and returns {name: [batch_size] or [batch_size, D]}.
  ``template``: the dataset whose chips the model was trained on (``align.template_for``).
  """
  forward: Callable
  image_size: int
  template: str = ''
  pp: str = 'value_range(-1, 1)'


def list_inputs(path: str) -> tuple[str, list[str]]:
  """(root, image files): ``path`` itself, or every image file below a folder, sorted.

  A missing path, or a folder without image files, is a DataError naming it.
  """
  if not path:
    raise ValueError('--input is required: a photo, a folder of photos, or a,b for verify')
  if not os.path.exists(path):
    raise DataError(f'--input {path}: no such file or directory')
  if os.path.isfile(path):
    return os.path.dirname(path), [path]
  found = sorted(os.path.join(d, f) for d, _, names in os.walk(path, followlinks=True)
                 for f in names if f.lower().endswith(EXTENSIONS))
  if not found:
    raise DataError(f'--input {path}: no image files ({", ".join(EXTENSIONS)}) in this folder')
  return path, found


def verify_pair(input_path: str) -> tuple[str, str]:
  """The two photos of ``--input=a.jpg,b.jpg``, each an existing file."""
  pair = [p.strip() for p in (input_path or '').split(',')]
  if len(pair) != 2 or not all(pair):
    raise ValueError(f'--mode=verify needs --input=a.jpg,b.jpg (two photos), got {input_path!r}')
  for p in pair:
    if not os.path.isfile(p):
      raise DataError(f'--input {p}: no such file')
  return pair[0], pair[1]


def check_inputs(mode: str, input_path: str, output: str) -> None:
  """--input / --output of --mode=predict or verify, before any model is loaded."""
  if mode == 'verify':
    verify_pair(input_path)
    return
  list_inputs(input_path)
  if not output:
    raise ValueError('--mode=predict needs --output (the CSV to write)')
  files.check_output_file(output, '--output')  # before any model loads: no scoring is lost


class Loader:
  """Decodes one input file and gives each head's preprocessed face."""

  def __init__(self, heads: list[Head], align_mode: str):
    if align_mode not in align_lib.ALIGN_MODES:
      raise ValueError(f'--align={align_mode!r}: expected one of {align_lib.ALIGN_MODES}')
    ops.keep_tensorflow_off_accelerators()
    self.heads, self.align_mode = heads, align_mode
    self.detector = align_lib.Detector() if align_mode == 'auto' else None
    self.pp = [ops.get_preprocess_fn(f'resize({h.image_size})|{h.pp}') for h in heads]

  def __call__(self, path: str) -> tuple[dict, list[np.ndarray] | None]:
    """(row: status, faces, alignment, note; one float32 face per head, or None)."""
    why, _ = images.inspect(path)
    if why:
      return {'status': 'corrupt', 'faces': '', 'alignment': '', 'note': why}, None
    if self.align_mode == 'none':  # exactly the evaluation pipeline's decode
      rgb = ops.decode_rgb(tf.io.read_file(path)).numpy()
      row, chips = {'status': 'ok', 'faces': '', 'alignment': 'none', 'note': ''}, [rgb] * len(self.heads)
    else:
      try:
        with Image.open(path) as image:  # photos: EXIF orientation applied
          rgb = np.asarray(ImageOps.exif_transpose(image).convert('RGB'))
      except Exception as e:  # pylint: disable=broad-except  # PIL raises many types.
        return {'status': 'corrupt', 'faces': '', 'alignment': '',
                'note': f'not an image: {type(e).__name__}: {e}'}, None
      found = align_lib.detect(self.detector, rgb)
      row = {'status': found.status, 'faces': found.faces, 'alignment': found.method,
             'note': ''}
      if found.eyes is None:
        return row, None
      chips = [align_lib.warp(self.detector.cv2, rgb, found.eyes,
                              align_lib.template_for(h.template), align_lib.CHIP_SIZE)
               for h in self.heads]
    return row, [pp({'image': c})['image'].numpy() for pp, c in zip(self.pp, chips)]


def score_files(paths, heads: list[Head], mesh, batch_size: int, align_mode: str,
                what: str = 'predict') -> tuple[list[dict], dict[str, np.ndarray]]:
  """(one row per path, {output name: [len(paths), ...]}); unscored rows hold NaN."""
  mesh_lib.check_batch_size(batch_size, 'eval_batch_size', mesh)
  loader, progress = Loader(heads, align_mode), progress_lib.Progress(what, len(paths))
  rows, outputs = [], {}
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    loaded = [loader(p) for p in chunk]
    rows += [row for row, _ in loaded]
    scored = [i for i, (_, faces) in enumerate(loaded) if faces is not None]
    for h, head in enumerate(heads):
      if not scored:
        break
      faces = np.stack([loaded[i][1][h] for i in scored])
      batch = np.zeros((batch_size, *faces.shape[1:]), faces.dtype)  # padded to a whole batch
      batch[:len(faces)] = faces
      out = head.forward(mesh_lib.put_batch({'image': batch}, mesh)['image'])
      for name, value in out.items():
        value = np.asarray(value, np.float32)[:len(faces)]
        if name not in outputs:
          outputs[name] = np.full((len(paths), *value.shape[1:]), np.nan, np.float32)
        outputs[name][[start + i for i in scored]] = value
    progress.update(start + len(chunk))
  return rows, outputs


def run(input_path: str, output: str, heads: list[Head], mesh, batch_size: int,
        align_mode: str, columns: Callable | None = None) -> dict:
  """Scores every image of ``input_path`` -> the ``output`` CSV (+ ``.npy`` per 2-D output).

  ``columns(outputs)`` turns the heads' outputs into CSV columns ({name: [N] values},
  e.g. class names); by default every 1-D output is a column.
  """
  check_inputs('predict', input_path, output)
  root, paths = list_inputs(input_path)
  logging.info('predict: %d image file(s) from %s, --align=%s', len(paths), input_path,
               align_mode)
  rows, outputs = score_files(paths, heads, mesh, batch_size, align_mode)
  scored = np.array([r['status'] in SCORED for r in rows])
  table = columns(outputs) if columns else {k: v for k, v in outputs.items() if v.ndim == 1}
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  stem = os.path.splitext(output)[0]
  arrays = {}
  for name, value in outputs.items():
    if value.ndim == 2:
      arrays[name] = f'{stem}_{name}.npy'
      np.save(arrays[name], value)
  with open(output, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['file', 'status', 'faces', 'alignment', *table, 'note'])
    for i, (path, row) in enumerate(zip(paths, rows)):
      cells = [_cell(v[i]) if scored[i] else '' for v in table.values()]
      writer.writerow([os.path.relpath(path, root) if root else path, row['status'],
                       row['faces'], row['alignment'], *cells, row['note']])
  counts = {s: sum(r['status'] == s for r in rows) for s in dict.fromkeys(r['status'] for r in rows)}
  logging.info('predict: wrote %s (%d rows: %s)%s', output, len(rows),
               ', '.join(f'{k} {v}' for k, v in counts.items()),
               ''.join(f'; {p}' for p in arrays.values()))
  return {'output': output, 'arrays': arrays, 'counts': counts, 'n': len(rows)}


def _cell(value) -> str:
  if isinstance(value, (str, np.str_)):
    return str(value)
  return f'{float(value):.9g}'  # float32 round trip
