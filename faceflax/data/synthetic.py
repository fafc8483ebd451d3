"""Procedurally drawn faces: the built-in default facial-beauty dataset.

Every face comes from a few latent traits, each ~N(0, 1) and clipped to ±2.5.
Five of them set the beauty score (eye size, smile, eye spacing near an ideal,
symmetry, skin smoothness); the rest (skin tone, eye height, mouth width, brow
tilt, hair, background, pose, noise) are nuisances, so a model must find the
relevant features in the pixels. Example i depends only on (seed, i, size),
never on num, so a small set is a prefix of a larger one.
"""
from __future__ import annotations

import csv
import functools
import json
import os

import numpy as np
from PIL import Image

GENERATOR_VERSION = 3  # bump when drawing changes so cached folders regenerate
TRAITS = ('eye_size', 'smile', 'eye_spacing', 'asymmetry', 'smoothness',
          'skin_tone', 'eye_height', 'mouth_width', 'brow_tilt')
SCORE_WEIGHTS = {'eye_size': 0.45, 'smile': 0.5, 'eye_spacing': 0.35,
                 'asymmetry': 0.3, 'smoothness': 0.4}
SCORE_MEAN, SCORE_SD = 3.0, 0.65   # roughly SCUT-FBP5500
LABEL_NOISE = 0.25                 # share of score sd that is irreducible
MAX_BLEMISHES = 8
_CHUNK = 128

_HAIR_PALETTE = np.array([[.08, .06, .05], [.30, .18, .10], [.55, .38, .20],
                          [.85, .72, .45], [.60, .25, .10], [.70, .70, .70]])
_IRIS_PALETTE = np.array([[.30, .18, .08], [.20, .35, .60], [.25, .45, .25],
                          [.10, .08, .06]])
_SKIN_LIGHT = np.array([.97, .84, .72])
_SKIN_DARK = np.array([.38, .24, .16])


# ---------------------------------------------------------------- sampling

def _sample(seed: int, i: int, size: int) -> dict:
    """All randomness of example i, drawn from its own stream."""
    rng = np.random.default_rng([seed, i])
    p = dict(zip(TRAITS, np.clip(rng.standard_normal(len(TRAITS)), -2.5, 2.5)))
    p['pose'] = rng.uniform(-1, 1, 3)            # dx, dy, scale
    p['face_shape'] = rng.uniform(-1, 1)
    p['bg'] = rng.uniform(0.7, 0.95, 3)          # light studio backdrops, like SCUT's
    p['hair'] = float(rng.random() < 0.7)
    p['hair_rgb'] = np.clip(_HAIR_PALETTE[rng.integers(len(_HAIR_PALETTE))]
                            + rng.normal(0, 0.04, 3), 0, 1)
    p['hair_len'] = rng.uniform(-0.1, 0.35)     # where back hair stops
    p['fringe'] = rng.uniform(0.06, 0.16)       # fringe thickness
    p['iris_rgb'] = _IRIS_PALETTE[rng.integers(len(_IRIS_PALETTE))]
    p['blemish_uv'] = rng.uniform([-.2, -.08], [.2, .24], (MAX_BLEMISHES, 2))
    p['label_noise'] = rng.standard_normal()
    p['texture'] = rng.standard_normal((size, size), dtype=np.float32)
    p['noise'] = rng.standard_normal((size, size, 3), dtype=np.float32)
    return p


def _stack(params: list[dict]) -> dict:
    return {k: np.stack([np.asarray(p[k]) for p in params]) for k in params[0]}


def beauty_score(traits: dict, label_noise) -> np.ndarray:
    """Smooth score from traits: linear in some, peaked at an ideal in others.

    Each term has mean 0, sd 1 for N(0, 1) traits, so z is ~N(0, 1).
    """
    terms = {
        'eye_size': traits['eye_size'],
        'smile': traits['smile'],
        'eye_spacing': -(traits['eye_spacing'] ** 2 - 1) / np.sqrt(2),
        'asymmetry': -(np.abs(traits['asymmetry']) - np.sqrt(2 / np.pi))
        / np.sqrt(1 - 2 / np.pi),
        'smoothness': traits['smoothness'],
    }
    w = np.array(list(SCORE_WEIGHTS.values()))
    z = sum(SCORE_WEIGHTS[k] * terms[k] for k in SCORE_WEIGHTS) / np.linalg.norm(w)
    z = np.sqrt(1 - LABEL_NOISE ** 2) * z + LABEL_NOISE * label_noise
    return np.clip(SCORE_MEAN + SCORE_SD * z, 1.0, 5.0).astype(np.float32)


# ---------------------------------------------------------------- drawing

def _ellipse(u, v, cu, cv, ru, rv, angle=0.0):
    """Approximate signed distance to an ellipse (negative inside), local units."""
    du, dv = u - cu, v - cv
    if not np.isscalar(angle) or angle != 0.0:
        c, s = np.cos(angle), np.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    r = np.sqrt((du / ru) ** 2 + (dv / rv) ** 2)
    return (r - 1) * np.minimum(ru, rv)


def _paint(canvas, dist, unit, rgb, extra=None):
    """Alpha-blend a colour where dist < 0, with a 1px anti-aliased edge."""
    alpha = np.clip(0.5 - dist * unit, 0, 1, dtype=np.float32)
    if extra is not None:
        alpha = alpha * extra
    # blend only inside the batch's bounding box: most parts are small
    rows, cols = np.flatnonzero(alpha.any(axis=(0, 2))), np.flatnonzero(alpha.any(axis=(0, 1)))
    if rows.size:
        box = np.s_[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        rgb = np.asarray(rgb, np.float32)[:, None, None, :]
        canvas[box] += alpha[box][..., None] * (rgb - canvas[box])
    return alpha


def _col(x):
    """[n] -> [n, 1, 1] for broadcasting against [n, H, W]."""
    return np.asarray(x, np.float32)[:, None, None]


def _draw(p: dict, size: int) -> np.ndarray:
    n = len(p['smile'])
    dx, dy, sc = (p['pose'][:, k] for k in range(3))
    unit = _col(size * (1 + 0.06 * sc))            # pixels per local unit
    grid = (np.arange(size, dtype=np.float32) + 0.5)[None]
    u = (grid[:, None, :] - _col(size * (0.5 + 0.035 * dx))) / unit
    v = (grid[:, :, None] - _col(size * (0.53 + 0.035 * dy))) / unit

    canvas = np.broadcast_to(p['bg'][:, None, None, :].astype(np.float32),
                             (n, size, size, 3)).copy()
    canvas *= (1.05 - 0.1 * v[..., None] / 0.5)    # gentle vertical light gradient
    skin = _SKIN_LIGHT + ((p['skin_tone'][:, None] + 2.5) / 5) * (_SKIN_DARK - _SKIN_LIGHT)
    hair = p['hair_rgb']
    has_hair = _col(p['hair'])
    fu, fv = _col(0.30 + 0.02 * p['face_shape']), 0.38

    # hair behind the head, cut at a random length
    back = np.maximum(_ellipse(u, v, 0, -0.04, fu + 0.07, fv + 0.05), v - _col(p['hair_len']))
    _paint(canvas, back, unit, hair, has_hair)
    _paint(canvas, np.maximum(np.abs(u) - 0.12, 0.2 - v), unit, skin * 0.85)   # neck
    ears = np.minimum(_ellipse(u, v, -fu, 0, 0.05, 0.08), _ellipse(u, v, fu, 0, 0.05, 0.08))
    _paint(canvas, ears, unit, skin * 0.92)
    face = _ellipse(u, v, 0, 0, fu, fv)
    face_a = _paint(canvas, face, unit, skin)
    _draw_skin(canvas, p, u, v, unit, face_a, skin)
    fringe = np.maximum(face, v - (-fv + _col(p['fringe']) + 0.25 * u ** 2))
    _paint(canvas, fringe, unit, hair, has_hair)
    _draw_eyes(canvas, p, u, v, unit, hair)
    _paint(canvas, _ellipse(u, v, 0, 0.07, 0.022, 0.06), unit, skin * 0.82)   # nose
    _draw_mouth(canvas, p, u, v, unit, skin)

    canvas += 0.03 * p['noise']                    # sensor noise (nuisance)
    return np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)


def _draw_skin(canvas, p, u, v, unit, face_a, skin):
    """Blemishes and texture: rougher skin for low smoothness."""
    smooth = p['smoothness']
    count = np.clip(np.round(4 - 3 * smooth), 0, MAX_BLEMISHES)
    spot = skin * np.array([0.72, 0.5, 0.48])
    dist = np.inf
    for k in range(MAX_BLEMISHES):  # union of active spots, painted once
        d = _ellipse(u, v, _col(p['blemish_uv'][:, k, 0]), _col(p['blemish_uv'][:, k, 1]),
                     0.03, 0.03)
        dist = np.minimum(dist, np.where(_col(count > k), d, np.inf))
    _paint(canvas, dist, unit, spot, face_a)
    amp = 0.01 + 0.08 / (1 + np.exp(2 * smooth))
    canvas += (_col(amp) * p['texture'] * face_a)[..., None]


def _draw_eyes(canvas, p, u, v, unit, brow_rgb):
    r = 0.045 * np.exp(0.22 * p['eye_size'])     # 1.7-5 px radius at 64 px
    half = 0.13 + 0.025 * p['eye_spacing']
    ev = -0.04 + 0.018 * p['eye_height']
    a = p['asymmetry']
    parts = {'white': [], 'iris': [], 'pupil': [], 'brow': []}
    for side in (-1, 1):
        # asymmetry moves the eyes apart vertically and makes their sizes differ
        cu, cv = _col(side * half), _col(ev + side * 0.03 * a)
        rr = _col(r * (1 + side * 0.2 * a))
        parts['white'].append(_ellipse(u, v, cu, cv, rr * 1.4, rr))
        parts['iris'].append(_ellipse(u, v, cu, cv, rr * 0.75, rr * 0.75))
        parts['pupil'].append(_ellipse(u, v, cu, cv, rr * 0.35, rr * 0.35))
        tilt = _col(side * 0.15 * p['brow_tilt'])
        parts['brow'].append(_ellipse(u, v, cu, cv - rr - 0.04, 0.065, 0.013, tilt))
    white = np.full_like(brow_rgb, 0.96)
    colours = {'white': white, 'iris': p['iris_rgb'], 'pupil': white * 0.05, 'brow': brow_rgb * 0.8}
    for name, (left, right) in parts.items():
        _paint(canvas, np.minimum(left, right), unit, colours[name])


def _draw_mouth(canvas, p, u, v, unit, skin):
    half_w = _col(0.09 + 0.015 * p['mouth_width'])
    amp = _col(0.05 * p['smile'])                 # >0: corners up (smile)
    t = np.clip(u / half_w, -1, 1)
    curve = 0.2 + amp * (1 - t ** 2)
    dist = np.maximum(np.abs(v - curve) - 0.018, np.abs(u) - half_w)
    _paint(canvas, dist, unit, skin * np.array([0.75, 0.38, 0.38]))


# ---------------------------------------------------------------- public API

def _generate(indices, size: int, seed: int):
    """Yield (images, params) chunks for the given example indices."""
    indices = list(indices)
    for start in range(0, len(indices), _CHUNK):
        p = _stack([_sample(seed, i, size) for i in indices[start:start + _CHUNK]])
        yield _draw(p, size), p


def _labels(p: dict) -> dict[str, np.ndarray]:
    out = {'score': beauty_score(p, p['label_noise'])}
    out.update({k: p[k].astype(np.float32) for k in TRAITS + ('hair',)})
    return out


def make_faces(num: int, *, size: int = 64, seed: int = 0
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw num faces: uint8 [num, size, size, 3] and labels (score in [1, 5] + traits)."""
    images, labels = [], []
    for img, p in _generate(range(num), size, seed):
        images.append(img)
        labels.append(_labels(p))
    if not images:
        return (np.zeros((0, size, size, 3), np.uint8),
                {k: np.zeros(0, np.float32) for k in ('score',) + TRAITS + ('hair',)})
    return (np.concatenate(images),
            {k: np.concatenate([l[k] for l in labels]) for k in labels[0]})


def write_folder_dataset(root, *, num_train, num_val, num_test=0, size=64, seed=0) -> str:
    """Write root/images/*.png and root/labels.csv (filename,score,split).

    Filenames are relative to root/images. Splits are consecutive index ranges
    of one stream, so they never share an example. Skipped when root already
    holds a dataset with the same parameters (recorded in root/synthetic.json).
    """
    root = os.fspath(root)
    meta = dict(num_train=int(num_train), num_val=int(num_val), num_test=int(num_test),
                size=int(size), seed=int(seed), version=GENERATOR_VERSION)
    meta_path, csv_path = os.path.join(root, 'synthetic.json'), os.path.join(root, 'labels.csv')
    if os.path.exists(csv_path) and _read_json(meta_path) == meta:
        return root

    img_dir = os.path.join(root, 'images')
    os.makedirs(img_dir, exist_ok=True)
    if os.path.exists(csv_path):
        os.remove(csv_path)  # a half-finished rewrite must not look complete
    splits = ['train'] * meta['num_train'] + ['val'] * meta['num_val'] + ['test'] * meta['num_test']
    rows, i = [], 0
    for images, p in _generate(range(len(splits)), size, seed):
        for img, score in zip(images, _labels(p)['score']):
            name = f'{i:06d}.png'
            Image.fromarray(img).save(os.path.join(img_dir, name))
            rows.append((name, f'{score:.4f}', splits[i]))
            i += 1
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    # labels.csv last and atomically: its presence marks a complete dataset
    _write_csv(csv_path, ('filename', 'score', 'split'), rows)
    return root


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- identities

# Drawn per image; everything else (traits, face shape, hair, iris) is the identity.
_PER_IMAGE = ('pose', 'bg', 'smile', 'label_noise', 'texture', 'noise')


def _sample_identity_image(seed: int, identity: int, shot: int, size: int) -> dict:
    p = _sample(seed, identity, size)
    rng = np.random.default_rng([seed, identity, shot, 1])
    p.update(pose=rng.uniform(-1, 1, 3), bg=rng.uniform(0.7, 0.95, 3),
             smile=float(np.clip(rng.standard_normal(), -2.5, 2.5)),
             label_noise=rng.standard_normal(),
             texture=rng.standard_normal((size, size), dtype=np.float32),
             noise=rng.standard_normal((size, size, 3), dtype=np.float32))
    assert set(_PER_IMAGE) <= set(p)
    return p


def write_identity_dataset(root, *, num_train_ids, num_val_ids, per_id, num_pairs,
                           size=64, seed=0) -> str:
    """Synthetic face-recognition data in the folder format.

    Writes root/images/*.png, root/labels.csv (filename,identity,split) with
    identity-disjoint train/val splits, and root/pairs_val.csv
    (file_a,file_b,same): num_pairs pairs of val images, half of them same-identity.
    Skipped when root already holds a dataset with the same parameters.
    """
    root = os.fspath(root)
    meta = dict(kind='identities', num_train_ids=int(num_train_ids), num_val_ids=int(num_val_ids),
                per_id=int(per_id), num_pairs=int(num_pairs), size=int(size), seed=int(seed),
                version=GENERATOR_VERSION)
    meta_path, csv_path = os.path.join(root, 'synthetic.json'), os.path.join(root, 'labels.csv')
    if os.path.exists(csv_path) and _read_json(meta_path) == meta:
        return root
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    if os.path.exists(csv_path):
        os.remove(csv_path)
    rows, by_id = [], {}
    for identity in range(num_train_ids + num_val_ids):
        p = _stack([_sample_identity_image(seed, identity, j, size) for j in range(per_id)])
        for j, img in enumerate(_draw(p, size)):
            name = f'id{identity:04d}_{j:02d}.png'
            Image.fromarray(img).save(os.path.join(root, 'images', name))
            split = 'train' if identity < num_train_ids else 'val'
            rows.append((name, identity, split))
            by_id.setdefault(identity, []).append(name)
    val_ids = list(range(num_train_ids, num_train_ids + num_val_ids))
    rng = np.random.default_rng([seed, 2])
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:
            names = by_id[val_ids[rng.integers(len(val_ids))]]
            a, b = rng.choice(len(names), 2, replace=False)
            pairs.append((names[a], names[b], 1))
        else:
            i, j = rng.choice(len(val_ids), 2, replace=False)
            pairs.append((rng.choice(by_id[val_ids[i]]), rng.choice(by_id[val_ids[j]]), 0))
    _write_csv(os.path.join(root, 'pairs_val.csv'), ('file_a', 'file_b', 'same'), pairs)
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    _write_csv(csv_path, ('filename', 'identity', 'split'), rows)  # last: marks completeness
    return root


def _write_csv(path, header, rows):
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def built_in(kind: str, workdir: str, settings: dict) -> str:
  """The folder of the built-in dataset ``kind`` ('faces': scored faces; 'identities':
  identities with verification pairs), drawn once into ``<workdir>/synthetic_<kind>`` with
  ``settings`` (a config's ``data.synthetic``) by process 0 while the others wait."""
  from faceflax import distributed  # pylint: disable=g-import-not-at-top  # jax
  from absl import logging  # pylint: disable=g-import-not-at-top
  name = f'synthetic_{kind}'
  write = {'faces': write_folder_dataset, 'identities': write_identity_dataset}[kind]
  folder = distributed.process_zero_first(
      functools.partial(write, os.path.join(workdir, name), **settings), name)
  logging.info('no data.dir given: using the built-in procedurally drawn %s in %s', kind, folder)
  return folder
