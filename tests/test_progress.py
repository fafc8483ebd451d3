"""Progress lines: the ETA arithmetic and when lines are logged, on a fake clock."""
import math

from faceflax import progress


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_eta_is_the_time_left_at_the_rate_so_far():
  assert progress.eta_seconds(25, 100, 10.0) == 30.0  # 2.5/s, 75 left
  assert progress.eta_seconds(100, 100, 7.0) == 0.0
  assert progress.eta_seconds(0, 100, 5.0) == math.inf
  assert [progress.duration(s) for s in (6.4, 245, 3723, math.inf)] == [
      '6s', '4m05s', '1h02m03s', '?']


def test_a_line_every_period_and_at_the_end():
  clock = _Clock()
  p = progress.Progress('screen', 100, every=10, clock=clock)
  clock.now = 4.0
  assert p.update(10) is None  # within the first period
  clock.now = 12.0
  assert p.update(30) == 'screen: 30/100 (30%), 2.5/s, ETA 28s'
  clock.now = 20.0
  assert p.update(50) is None  # 8 s since the last line
  clock.now = 40.0
  assert p.update(80) == 'screen: 80/100 (80%), 2.0/s, ETA 10s'
  clock.now = 41.0
  assert p.update(100) == 'screen: 100/100 (100%), 2.4/s, ETA 0s'  # the end, always


def test_quiet_loops_that_end_within_one_period():
  clock = _Clock()
  p = progress.Progress('probe', 4, every=10, quiet_if_short=True, clock=clock)
  clock.now = 3.0
  assert p.update(4) is None
  p = progress.Progress('eval', 4, every=10, quiet_if_short=True, clock=clock)
  clock.now = 20.0
  assert p.update(4) == 'eval: 4/4 (100%), 0.2/s, ETA 0s'


def test_logged_yields_every_item_and_counts_whole_batches(monkeypatch):
  lines = []
  monkeypatch.setattr(progress.logging, 'info', lambda fmt, line: lines.append(line))
  clock = _Clock()

  def items():
    for item in 'abc':
      clock.now += 10.0  # each batch takes one period
      yield item
  assert list(progress.logged(items(), 'eval', 5, per_item=2, every=10, clock=clock)) == [
      'a', 'b', 'c']
  assert lines == ['eval: 2/5 (40%), 0.2/s, ETA 15s', 'eval: 4/5 (80%), 0.2/s, ETA 5s',
                   'eval: 5/5 (100%), 0.2/s, ETA 0s']


def test_screening_the_training_cache_and_eval_passes_log_their_progress(tmp_path, monkeypatch):
  from PIL import Image
  from faceflax.data import pipeline, synthetic
  images, _ = synthetic.make_faces(6, size=16, seed=0)
  paths = [str(tmp_path / f'{i}.png') for i in range(6)]
  for image, path in zip(images, paths):
    Image.fromarray(image).save(path)
  lines = []
  monkeypatch.setattr(progress.logging, 'info', lambda fmt, line: lines.append(line))
  monkeypatch.setattr(progress, 'EVERY_SECONDS', 0.0)  # a line at each update
  next(pipeline.make_train_dataset(paths, {}, batch_size=2, pp='value_range(-1, 1)', seed=0,
                                   cache_pp='decode|resize(8)'))
  cached = [l for l in lines if l.startswith('caching the training images')]
  assert len(cached) == 6 and cached[-1].split(',')[0].endswith(': 6/6 (100%)')
  lines.clear()
  ds = pipeline.make_eval_dataset(paths, {}, batch_size=4, pp='value_range(-1, 1)',
                                  cache_pp='decode|resize(8)', progress='evaluate')
  assert len(list(ds)) == 2
  assert [l.split(',')[0] for l in lines if l.startswith('evaluate')] == [
      'evaluate: 4/6 (67%)', 'evaluate: 6/6 (100%)']
  # the up-front screening of the images (its own loop, once per file)
  assert lines[5].split(',')[0] == 'input pipeline: screening images: 6/6 (100%)'
