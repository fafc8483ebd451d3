import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from faceflax.data.synthetic import TRAITS, make_faces, write_folder_dataset


@pytest.fixture(scope='module')
def faces():
    return make_faces(2000, seed=0)


def _pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def _ridge_r(x, y, n_train, lam=10.0):
    """Closed-form ridge on standardised features; Pearson r on held-out rows."""
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    a = z[:n_train]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y[:n_train])
    return _pearson(z[n_train:] @ w, y[n_train:])


@pytest.mark.parametrize('size', [32, 64])
def test_shapes_dtypes_range(size):
    images, labels = make_faces(12, size=size, seed=3)
    assert images.shape == (12, size, size, 3) and images.dtype == np.uint8
    assert {'score', *TRAITS} <= set(labels)
    for v in labels.values():
        assert v.shape == (12,) and v.dtype == np.float32
    assert labels['score'].min() >= 1 and labels['score'].max() <= 5
    assert images.std() > 20  # actually drawn, not blank


def test_empty():
    images, labels = make_faces(0)
    assert images.shape == (0, 64, 64, 3) and labels['score'].shape == (0,)


def test_deterministic():
    a, la = make_faces(20, seed=7)
    b, lb = make_faces(20, seed=7)
    assert a.tobytes() == b.tobytes()
    assert all(np.array_equal(la[k], lb[k]) for k in la)
    c, _ = make_faces(20, seed=8)
    assert not np.array_equal(a, c)


def test_examples_independent_of_num():
    small, ls = make_faces(5, seed=1)
    big, lb = make_faces(300, seed=1)  # spans several internal chunks
    assert np.array_equal(small, big[:5])
    assert np.array_equal(ls['score'], lb['score'][:5])
    assert len({img.tobytes() for img in big}) == len(big)


def test_score_distribution(faces):
    score = faces[1]['score']
    assert 2.8 < score.mean() < 3.2
    assert 0.5 < score.std() < 0.8
    assert score.min() < 2 and score.max() > 4


def test_nuisances_do_not_set_score(faces):
    labels = faces[1]
    for k in ('skin_tone', 'eye_height', 'mouth_width', 'brow_tilt', 'hair'):
        assert abs(_pearson(labels[k], labels['score'])) < 0.1, k
    assert _pearson(labels['smile'], labels['score']) > 0.3


def test_score_is_learnable_from_pixels(faces):
    images, labels = faces
    grey = images.astype(np.float32).mean(-1) / 255
    x = grey.reshape(-1, 16, 4, 16, 4).mean((2, 4)).reshape(len(images), -1)
    y = labels['score'].astype(np.float64)
    assert _ridge_r(x, y, 1500) > 0.5
    shuffled = np.random.default_rng(0).permutation(y)
    assert abs(_ridge_r(x, shuffled, 1500)) < 0.2


def test_write_folder_dataset(tmp_path):
    root = str(tmp_path / 'fbp')
    kw = dict(num_train=6, num_val=3, num_test=2, size=32, seed=5)
    assert write_folder_dataset(root, **kw) == root
    with open(os.path.join(root, 'labels.csv')) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['filename', 'score', 'split']
    assert [r['split'] for r in rows] == ['train'] * 6 + ['val'] * 3 + ['test'] * 2
    images, labels = make_faces(11, size=32, seed=5)
    for r, img, score in zip(rows, images, labels['score']):
        png = np.asarray(Image.open(os.path.join(root, 'images', r['filename'])))
        assert np.array_equal(png, img)  # PNG is lossless
        assert abs(float(r['score']) - score) < 1e-3
    assert json.load(open(os.path.join(root, 'synthetic.json')))['seed'] == 5

    # idempotent: same parameters leave files untouched
    stamp = {n: os.stat(os.path.join(root, n)).st_mtime_ns for n in ('labels.csv', 'synthetic.json')}
    write_folder_dataset(root, **kw)
    assert stamp == {n: os.stat(os.path.join(root, n)).st_mtime_ns for n in stamp}

    # different parameters regenerate
    write_folder_dataset(root, **{**kw, 'num_val': 1})
    with open(os.path.join(root, 'labels.csv')) as f:
        assert sum(1 for _ in f) == 1 + 6 + 1 + 2


def test_save_grid(faces):
    """Writes a 4x4 grid for eyeballing; scores are in the same order."""
    images = faces[0][:16]
    grid = images.reshape(4, 4, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(256, 256, 3)
    Image.fromarray(grid).resize((512, 512), Image.NEAREST).save('/tmp/synthetic_grid.png')
    assert os.path.getsize('/tmp/synthetic_grid.png') > 0
