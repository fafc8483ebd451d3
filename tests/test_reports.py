"""Visual reports: renderers draw what they claim; each task's tiny job writes its PNGs."""
import os

import numpy as np
from PIL import Image

from faceflax import reports
from faceflax.reports import MARGIN, SIZE
from tests import test_age, test_transfer
from tests.conftest import copy_workdir

faces = test_age.faces  # the tiny age dataset fixture


def _is_rgb_uint8(img):
  return img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8


def test_scatter_of_perfect_predictions_lies_on_the_diagonal():
  true = np.linspace(1, 5, 9)
  img = reports.scatter(true, true, 'perfect')
  assert _is_rgb_uint8(img) and img.shape[:2] == (SIZE + 2 * MARGIN,) * 2
  blue = np.all(img == reports.POINT, axis=-1)
  ys, xs = np.nonzero(blue)
  assert len(xs) > 9
  # every point pixel is within the dot radius of y = x (pixel rows grow downwards)
  assert np.all(np.abs((xs - MARGIN) - (MARGIN + SIZE - ys)) <= 6)
  # and the points spread from bottom-left to top-right
  assert xs.min() < MARGIN + 20 and xs.max() > MARGIN + SIZE - 20
  # wrong predictions (pred = 6 - true) fall off the diagonal
  off = np.all(reports.scatter(6 - true, true) == reports.POINT, axis=-1)
  ys, xs = np.nonzero(off)
  assert np.abs((xs - MARGIN) - (MARGIN + SIZE - ys)).max() > 100


def test_confusion_matrix_brightest_cells_match_numpy_counts():
  rng = np.random.default_rng(0)
  true = rng.integers(0, 4, 400)
  pred = np.where(rng.random(400) < 0.7, (true + 1) % 4, true)  # mostly shifted by one
  pred[:5] = -1  # unknown labels are dropped
  names = ['a', 'b', 'c', 'd']
  img = reports.confusion_matrix_image(pred, true, names, 'test')
  assert _is_rgb_uint8(img)
  ok = pred >= 0
  counts = np.zeros((4, 4), int)
  np.add.at(counts, (true[ok], pred[ok]), 1)
  np.testing.assert_array_equal(reports.confusion_counts(pred, true, 4), counts)
  cell = max(SIZE // 4, 12)
  left, top = MARGIN + 60, MARGIN
  # sample each cell's corner (away from the count text) and compare the argmax per row
  bright = np.array([[img[top + i * cell + cell - 4, left + j * cell + cell - 4, 1]
                      for j in range(4)] for i in range(4)])
  np.testing.assert_array_equal(bright.argmax(1), counts.argmax(1))
  np.testing.assert_array_equal(bright.argmax(1), (np.arange(4) + 1) % 4)


def test_roc_of_a_perfect_classifier_touches_the_top_left_corner():
  from faceflax import metrics
  same = np.array([1] * 50 + [0] * 50, bool)
  perfect = np.where(same, 0.9, 0.1) + np.linspace(0, 0.01, 100)
  fpr, tpr, _ = metrics.roc_curve(perfect, same)
  img = reports.roc_image(fpr, tpr, 'perfect')
  assert _is_rgb_uint8(img)
  curve = np.all(img == reports.CURVES[0], axis=-1)
  assert curve[MARGIN - 1:MARGIN + 2, MARGIN - 1:MARGIN + 2].any()  # (fpr 0, tpr 1)
  # a random classifier's curve stays away from that corner; several curves are allowed
  rnd = np.random.default_rng(0).random(100)
  fpr2, tpr2, _ = metrics.roc_curve(rnd, same)
  img2 = reports.roc_image([fpr2, fpr], [tpr2, tpr], ['random', 'perfect'])
  first = np.all(img2 == reports.CURVES[0], axis=-1)
  assert not first[MARGIN - 1:MARGIN + 25, MARGIN - 1:MARGIN + 25].any()
  assert np.all(img2 == reports.CURVES[1], axis=-1)[MARGIN - 1:MARGIN + 2, MARGIN - 1:MARGIN + 2].any()


def test_attention_overlay_upsamples_and_heats_the_attended_region():
  grey = np.full((2, 32, 32, 3), 0.5, np.float32)
  maps = np.zeros((2, 4, 4))
  maps[:, 0, 0] = 1.0  # attend to the top-left 8x8 block
  img = reports.attention_overlay(grey, maps)
  assert _is_rgb_uint8(img) and img.shape == (64, 64, 3)
  over = img[:32, 32:].astype(int)
  assert over[2, 2, 0] > over[2, 2, 2]  # red where attended
  assert over[20, 20, 2] > over[20, 20, 0]  # blue elsewhere
  np.testing.assert_array_equal(img[:32, :32], 128)  # the face itself, untouched
  assert reports.attention_overlay(np.zeros((1, 16, 16, 3), np.uint8),
                                   np.ones((1, 2, 2, 1))).shape == (16, 32, 3)
  # several maps (one per stage): the face, then one overlay column each
  several = reports.attention_overlay(grey, [maps, np.zeros((2, 2, 2))])
  assert several.shape == (64, 96, 3)
  np.testing.assert_array_equal(several[:, :64], img)


def test_bar_chart_bars_have_the_numpy_length_of_their_values():
  values = np.array([0.0, 0.25, 0.5, 0.9, 1.0, 1.7, -0.2])  # the last two are clipped
  img = reports.bar_chart(values, [f'attr_{i}' for i in range(7)], 'test')
  assert _is_rgb_uint8(img)
  left, row = MARGIN + reports.BAR_LABEL, reports.BAR_ROW
  expected = np.round(SIZE * np.clip(values, 0, 1)).astype(int)
  middle = MARGIN + np.arange(7) * row + row // 2
  lengths = np.all(img[middle, left:] == reports.POINT, axis=-1).sum(1)
  np.testing.assert_array_equal(lengths, expected)


class _Writer:
  def __init__(self):
    self.images = {}

  def write_images(self, step, images):
    self.images.update(images)


def test_save_writes_png_and_tensorboard(tmp_path):
  writer = _Writer()
  img = np.random.default_rng(0).random((10, 12, 3))
  path = reports.save(str(tmp_path), 'x/y', img, writer)
  assert path == os.path.join(str(tmp_path), 'reports', 'x/y.png')
  np.testing.assert_array_equal(np.asarray(Image.open(path)), reports.to_uint8(img))
  assert writer.images['reports/x/y'].shape == (1, 10, 12, 3)


def test_fbp_test_job_writes_its_report_pngs(fbp_job):
  from tests import configs_for_tests
  config = configs_for_tests.load('fbp_kd', 'test')
  reports_dir = fbp_job[0] / 'reports'  # app.run(config, workdir), once per session
  names = sorted(p.name for p in reports_dir.glob('*.png'))
  assert names == ['eval_student_scatter.png', 'eval_teacher_scatter.png',
                   'teacher_pretrain_reconstruction.png']
  grid = np.asarray(Image.open(reports_dir / 'teacher_pretrain_reconstruction.png'))
  size = config.data.image_size
  assert grid.shape == (4 * size, 3 * size, 3)
  scatter = np.asarray(Image.open(reports_dir / 'eval_teacher_scatter.png'))
  assert np.all(scatter == reports.POINT, axis=-1).sum() > 0  # the points are drawn


def test_age_job_writes_scatter_confusions_and_msa_attention(faces, age_job, tmp_path):
  from faceflax import app
  config = test_age._config(faces)
  copy_workdir(age_job[0], tmp_path)  # app.run(config, workdir), once per session
  names = {p.name for p in (tmp_path / 'reports').glob('*.png')}
  assert {'eval_age_scatter.png', 'eval_gender_confusion.png', 'eval_race_confusion.png',
          'eval_msa_attention.png'} <= names, names
  overlay = np.asarray(Image.open(tmp_path / 'reports' / 'eval_msa_attention.png'))
  size = config.data.image_size
  assert overlay.shape == (4 * size, (1 + len(config.model.msa_stages)) * size, 3)
  # --mode=eval writes its own, named after the evaluated folder
  config.eval.split = 'val'
  app.run(config, str(tmp_path), mode='eval')
  assert (tmp_path / 'reports' / f'eval_{faces.name}_race_confusion.png').exists()


def test_lqfr_job_writes_roc_per_quality_and_cbam_attention(lqfr_job):
  from tests import configs_for_tests
  config = configs_for_tests.load('lqfr_kd', 'test')
  reports_dir = lqfr_job[0] / 'reports'  # app.run(config, workdir), once per session
  names = {p.name for p in reports_dir.glob('*.png')}
  assert names == {f'eval_{who}_{kind}.png' for who in ('teacher', 'student_both')
                   for kind in ('roc', 'cbam_attention')}, names
  roc = np.asarray(Image.open(reports_dir / 'eval_teacher_roc.png'))
  for colour in reports.CURVES[:3]:  # hq, 8px_both, 8px_probe_vs_hq
    assert np.all(roc == colour, axis=-1).any()
  overlay = np.asarray(Image.open(reports_dir / 'eval_teacher_cbam_attention.png'))
  assert overlay.shape[0] == 4 * config.data.image_size and overlay.shape[1] > 2 * config.data.image_size


def test_transfer_job_writes_a_picture_per_task_and_protocol(transfer_job, tmp_path):
  copy_workdir(transfer_job[0], tmp_path)  # app.run(test_transfer.job_config(...), workdir)
  names = {p.name for p in (tmp_path / 'reports').glob('*.png')}
  kinds = {'expression': 'confusion', 'attributes': 'accuracy', 'age': 'scatter',
           'beauty': 'scatter'}
  assert names == {f'eval_{t}_{p}_{k}.png' for t, k in kinds.items()
                   for p in ('linear', 'fewshot', 'finetune')}, names
  bars = np.asarray(Image.open(tmp_path / 'reports' / 'eval_attributes_linear_accuracy.png'))
  assert bars.shape[0] == 2 * MARGIN + len(test_transfer.ATTRIBUTES) * reports.BAR_ROW
  confusion = np.asarray(Image.open(tmp_path / 'reports' / 'eval_expression_finetune_confusion.png'))
  assert confusion.shape[0] > 7 * (SIZE // 7)  # one row per FER class


def test_face_prior_job_writes_its_reconstruction(face_prior_job, tmp_path):
  from faceflax import app
  trained, config = face_prior_job  # app.run(config, workdir), once per session
  work = copy_workdir(trained, tmp_path / 'work')  # --mode=eval below writes into it
  grid = np.asarray(Image.open(work / 'reports' / 'eval_reconstruction.png'))
  size = config.data.image_size
  assert grid.shape == (4 * size, 3 * size, 3)
  masked, original = grid[:, :size].astype(int), grid[:, 2 * size:].astype(int)
  # the input column is the original with the masked patches grey (0 in [-1, 1])
  hidden = np.any(masked != original, axis=-1)
  assert np.all(masked[hidden] == 128) and 0.5 < hidden.mean() <= 0.75
  app.run(config, str(work), mode='eval')  # named after the evaluated split
  assert (work / 'reports' / 'eval_val_reconstruction.png').exists()
