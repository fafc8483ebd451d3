"""Face verification: the image qualities, embeddings, pair accuracy tables and the
validated decision threshold of ``--mode=verify`` (low-quality face recognition, lqfr_kd).

A verification set is a pairs CSV over a folder-format dataset or an insightface ``.bin``
(AgeDB-30, CPLFW, ...); each image is embedded once per quality, and each pair scored by
the cosine of its two embeddings: 10-fold accuracy (threshold chosen on the other folds)
and TAR at a FAR, for both sides degraded and for a degraded probe against an HQ gallery.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from faceflax import metrics
from faceflax.data import pairs as pairs_lib, pipeline
from faceflax.data.errors import DataError
from faceflax.data.folder import load_array, read_folder
from faceflax.train import evaluation, mesh as mesh_lib


def qualities(config) -> list[str]:
  """'hq'; 'N': down to N px (area) and back; 'xF': the low-resolution protocol of
  the paper and of the face-SR literature, a Gaussian blur of sigma F/2 then bicubic
  downsampling by F (antialiased, as MATLAB's imresize) and bicubic back."""
  out = [q.strip() for q in config.eval.qualities.split(',') if q.strip()]
  for q in out:
    if q != 'hq' and not q.isdigit() and not (q[:1] == 'x' and q[1:].isdigit() and int(q[1:])):
      raise ValueError(f"eval.qualities: {q!r} is neither 'hq', a size in pixels nor a "
                       "downsampling factor 'x2', 'x4', ...")
  return out


def quality_pp(quality: str, size: int, eval_pp: str) -> str:
  """The eval preprocessing of one ``qualities`` entry: its degradation (the degraded view
  is 'image_lq'), then ``eval_pp`` (``data.eval_pp``, as every evaluation and prediction)."""
  if quality == 'hq':
    return eval_pp
  if quality.isdigit():
    return f'degrade(resolution={int(quality)})|{eval_pp}'
  factor = int(quality[1:])
  return (f'degrade(resolution={max(1, size // factor)}, blur={factor / 2}, '
          f"downsample='bicubic')|{eval_pp}")


def embedding_fn(model, mesh):
  """Jitted (variables, images) -> L2-normalised embeddings, replicated."""
  def forward(v, x):
    e = model.apply(v, x)['embedding'].astype(jnp.float32)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return jax.jit(forward, out_shardings=mesh_lib.replicated(mesh))


def embed(model, variables, paths, config, mesh, quality: str, forward=None) -> np.ndarray:
  """L2-normalised embeddings of ``paths`` (in order) at one image quality.

  Pass ``forward`` (from ``embedding_fn``) to reuse one compiled function across qualities.
  """
  return evaluation.predict_all(
      forward or embedding_fn(model, mesh), variables, paths, mesh,
      batch_size=config.eval_batch_size,
      pp=quality_pp(quality, config.data.image_size, config.data.eval_pp),
      cache_pp=pipeline.cache_pp(config), image_key='image' if quality == 'hq' else 'image_lq',
      validate=False, progress=f'embed ({quality})')


def verification_table(embeddings: dict, pairs, config, rocs: dict | None = None) -> dict:
  """embeddings: quality -> [N, D] over the unique images; pairs index into them.

  ``rocs`` (if given) receives each row's ROC curve: key -> (fpr, tpr).
  """
  a, b, same = pairs
  table = {}
  hq = embeddings.get('hq')
  for q, e in embeddings.items():
    sides = {'both': e[b]}
    if q != 'hq' and hq is not None:
      sides['probe_vs_hq'] = hq[b]  # degraded probe against a high-quality gallery
    for side, gallery in sides.items():
      sim = np.sum(e[a] * gallery, axis=1)
      acc = metrics.verification_accuracy(sim, same, num_folds=config.eval.num_folds)
      tar, _ = metrics.tar_at_far(sim, same, far=config.eval.far)
      key = q if q == 'hq' else f'{q}px_{side}' if q.isdigit() else f'{q}_{side}'
      table[key] = {**acc, f'tar_at_far_{config.eval.far:g}': tar}
      if rocs is not None:
        rocs[key] = metrics.roc_curve(sim, same)[:2]
  return table


def score_model(model, variables, sets, config, mesh, forward=None, on_set=None) -> dict:
  """The verification cells of one model on every set of ``eval_sets`` at every quality:
  one set's cells at the top ('hq', '14px_both'), several sets' as 'agedb_30/hq', ...;
  ``on_set(set_name, images, rocs)`` after each set (report pictures)."""
  return score_embeddings(
      lambda images, q: embed(model, variables, images, config, mesh, q, forward), sets,
      config, on_set)


def score_embeddings(embed_at, sets, config, on_set=None) -> dict:
  """``score_model`` for any embedding: ``embed_at(images, quality)`` -> [N, D] unit rows."""
  cells = {}
  for set_name, images, pairs in sets:
    emb = {q: embed_at(images, q) for q in qualities(config)}
    rocs = {}
    table = verification_table(emb, pairs, config, rocs)
    cell_prefix = '' if len(sets) == 1 else f'{set_name}/'
    cells.update({cell_prefix + k: v for k, v in table.items()})
    if on_set is not None:
      on_set(set_name, images, rocs)
  return cells


def data_summary(config, sets) -> dict:
  """What was scored: the data, its pairs files and (first set) the pair and image counts."""
  _, images, pairs = sets[0]
  out = {'dir': config.data.dir, 'pairs': config.data.eval_pairs,
         'num_pairs': int(len(pairs[2])), 'num_images': len(images)}
  if len(sets) > 1:
    out['sets'] = {n: {'num_pairs': int(len(p[2])), 'num_images': len(i)} for n, i, p in sets}
  return out


def eval_sets(config) -> list[tuple[str, object, tuple]]:
  """(name, images, (index_a, index_b, same)) of each ``data.eval_pairs`` entry.

  An entry is a pairs CSV over ``data.dir``/images (images: the unique paths) or an
  insightface verification file such as ``agedb_30.bin`` or ``cplfw.bin`` beside a
  training pack (images: its encoded bytes, a0, a1, ..., b0, b1, ...).
  """
  entries = [e.strip() for e in config.data.eval_pairs.split(',') if e.strip()]
  if not entries:
    raise ValueError('config.data.eval_pairs is empty: name a pairs CSV or .bin file')
  sets = []
  for entry in entries:
    path = os.path.join(config.data.dir, entry)
    name = os.path.splitext(os.path.basename(entry))[0]
    if entry.endswith('.bin'):
      b = pairs_lib.read_bin(path)
      n = len(b)
      images = pipeline.EncodedImages(np.concatenate([b.images_a, b.images_b]), path)
      sets.append((name, images, (np.arange(n), np.arange(n, 2 * n), b.same)))
      continue
    p = pairs_lib.read_pairs_csv(path, os.path.join(config.data.dir, 'images'))
    unique, inverse = np.unique(np.concatenate([p.paths_a, p.paths_b]), return_inverse=True)
    n = len(p.paths_a)
    pipeline.validate_images(list(unique))
    sets.append((name, tuple(unique), (inverse[:n], inverse[n:], np.asarray(p.same, bool))))
  return sets


def eval_pairs(config):
  """(images, (index_a, index_b, same)) of the first verification set (``eval_sets``)."""
  return eval_sets(config)[0][1:]


def external_reference(config, paths, pairs) -> dict | None:
  """The external teacher's own HQ verification accuracy, when it covers the pair images."""
  path = os.path.join(config.data.dir, config.data.external_teacher)
  if (not config.data.external_teacher or not os.path.isfile(path)
      or not isinstance(paths, tuple)):  # .bin pairs: not images of data.dir
    return None
  everything = read_folder(config.data.dir, check_files=False)
  row = {p: i for i, p in enumerate(everything.paths)}
  if not all(p in row for p in paths):
    return None
  emb = load_array(path)[[row[p] for p in paths]].astype(np.float64)
  emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return verification_table({'hq': emb}, pairs, config)


def validated_threshold(config, workdir: str, name: str, model, variables,
                        mesh) -> tuple[float, str]:
  """(threshold, where it came from) of model ``name``: the mean of the 10 folds' best
  thresholds on the verification pairs at full quality, from ``<workdir>/results.json``,
  else computed on ``data.eval_pairs`` (``config`` with its data.dir)."""
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      hq = json.load(f).get(name, {}).get('hq', {})
    if 'threshold' in hq:
      return float(hq['threshold']), f'{path} ({name}, hq)'
  logging.info('%s has no validated threshold for %s: computing it on %s', path, name,
               config.data.eval_pairs)
  paths, pairs = eval_pairs(config)
  emb = {'hq': embed(model, variables, paths, config, mesh, 'hq')}
  where = os.path.join(config.data.dir, config.data.eval_pairs)
  return float(verification_table(emb, pairs, config)['hq']['threshold']), f'{where} (hq)'


def verify_photos(input_path: str, head, threshold_of, mesh, batch_size: int,
                  align: str) -> dict:
  """``--mode=verify``: the cosine similarity of the faces of two photos (``input_path``
  'a,b') under each embedding of ``head`` (a ``predict.Head`` with unit embeddings and
  their ``<name>_norm``), and the decision at ``threshold_of(name)`` = (threshold, where
  it came from); printed and returned."""
  from faceflax import predict  # pylint: disable=g-import-not-at-top  # TensorFlow
  pair = predict.verify_pair(input_path)
  rows, outputs = predict.score_files(list(pair), [head], mesh, batch_size, align, 'verify')
  for path, row in zip(pair, rows):
    if row['status'] not in predict.SCORED:
      raise DataError(f'--input {path}: {row["status"]}{": " + row["note"] if row["note"] else ""}'
                      ' (verify needs one face in each photo)')
    if row['status'] == 'several_faces':
      logging.warning('%s: %d faces, comparing the largest', path, row['faces'])
  results = {}
  for name in (n for n in outputs if not n.endswith('_norm')):
    threshold, source = threshold_of(name)
    similarity = float(np.dot(outputs[name][0], outputs[name][1]))
    same = similarity > threshold
    results[name] = {'similarity': similarity, 'threshold': threshold, 'same': bool(same),
                     'threshold_from': source}
    print(f'{name}: cosine similarity {similarity:.4f}, threshold {threshold:.4f} -> '
          f'{"same person" if same else "different people"}')
  return results
