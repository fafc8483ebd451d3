"""Preprocessing ops on feature dicts, composed from spec strings (big_vision style).

A spec like "decode|resize(64)|flip_lr|value_range(-1,1)" names registered op
factories; each is called with the literal arguments in parentheses and returns
a function dict -> dict on tf tensors. Ops act on features['image'] and keep
its dtype (uint8 stays uint8, rounded) except `decode` (bytes -> uint8) and
`value_range` (-> float32). After `degrade`, which adds a low-quality copy
features['image_lq'], the later ops transform both images with the same random
draws so they stay pixel-aligned. Geometric ops (resize, crop, flip) also move
a float region map features['regions'] (from `face_regions`) with the image;
photometric ops leave it alone. Random ops are stateless: they draw from the
per-example seed features['rng'] (shape [2]) and replace it with a fresh one,
so the same seed always gives the same augmentation.
"""

import ast
import math
from typing import Callable

from etils import epy

with epy.lazy_imports():  # TensorFlow loads at first use: building or timing a step needs none
  import tensorflow as tf

def keep_tensorflow_off_accelerators() -> None:
  """tf.data must never grab accelerator memory: JAX owns the GPUs. Called by the entry
  points that build input pipelines (``pipeline``, ``predict``, ``app.run``) before
  TensorFlow places anything, not on import; idempotent."""
  try:
    if tf.config.get_visible_devices('GPU'):
      tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # TensorFlow's devices were initialised already.
    pass

Features = dict[str, 'tf.Tensor']
IMAGE_KEYS = ('image', 'image_lq')  # Transformed alike by every op after `degrade`.
GEOMETRIC_KEYS = IMAGE_KEYS + ('regions',)  # Resized, cropped and flipped alike.
_OPS: dict[str, Callable[..., Callable[[Features], Features]]] = {}


def register(name):
  def decorator(factory):
    _OPS[name] = factory
    return factory
  return decorator


def _parse_op(text):
  """"name(1, b=(2, 3))" -> ("name", [1], {"b": (2, 3)}), literals only."""
  try:
    node = ast.parse(text if '(' in text else f'{text}()', mode='eval').body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
      raise ValueError('not a call')
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except (SyntaxError, ValueError) as e:
    raise ValueError(f'bad preprocessing op {text!r}: {e}') from e
  if node.func.id not in _OPS:
    raise ValueError(f'unknown preprocessing op {node.func.id!r}; '
                     f'known ops: {sorted(_OPS)}')
  return node.func.id, args, kwargs


def get_preprocess_fn(spec: str) -> Callable[[Features], Features]:
  """Composes the ops of `spec` ("op1|op2(args)|...") into one function."""
  ops = []
  for text in filter(None, map(str.strip, spec.split('|'))):
    name, args, kwargs = _parse_op(text)
    ops.append(_OPS[name](*args, **kwargs))

  def preprocess(features):
    features = {k: tf.convert_to_tensor(v) for k, v in features.items()}  # Eager use.
    for op in ops:
      features = op(dict(features))
    return features
  return preprocess


def _next_seed(features, op_name):
  """Splits features['rng']: one seed for this op, one left for the next ops."""
  if 'rng' not in features:
    raise ValueError(f'random op {op_name!r} needs a per-example seed in key '
                     '"rng"; random ops do not belong in eval preprocessing')
  seed, features['rng'] = tf.unstack(
      tf.random.experimental.stateless_split(features['rng'], 2))
  return seed


def _like(image, dtype):
  """Casts back to `dtype`, rounding and saturating for integer types."""
  if dtype.is_integer:
    return tf.saturate_cast(tf.round(image), dtype)
  return tf.cast(image, dtype)


def _image_keys(features, keys=IMAGE_KEYS):
  return [key for key in keys if key in features]


def _resize(image, size):
  size = (size, size) if isinstance(size, int) else tuple(size)
  resized = tf.image.resize(image, size, method='bilinear', antialias=True)
  return _like(resized, image.dtype)


def decode_rgb(data):
  """Encoded image bytes -> uint8 [H, W, 3], as every pipeline decodes (and validates) them.

  channels=3 turns greyscale into RGB so every dataset has the same shape; an
  animation gives its first frame.
  """
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


@register('decode')
def get_decode():
  def decode(features):
    features['image'] = decode_rgb(features['image'])
    return features
  return decode


@register('resize')
def get_resize(size):
  def resize(features):
    for key in _image_keys(features, GEOMETRIC_KEYS):
      features[key] = _resize(features[key], size)
    return features
  return resize


@register('random_resized_crop')
def get_random_resized_crop(size, scale=(0.8, 1.0), ratio=(0.9, 1 / 0.9)):
  """Crop of `scale` x the area and aspect `ratio`, resized; defaults suit aligned faces."""
  def random_resized_crop(features):
    image = features['image']
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]),
        seed=_next_seed(features, 'random_resized_crop'), min_object_covered=0.0,
        area_range=scale, aspect_ratio_range=ratio,
        use_image_if_no_bounding_boxes=True)
    for key in _image_keys(features, GEOMETRIC_KEYS):
      features[key] = _resize(tf.slice(features[key], begin, crop_size), size)
    return features
  return random_resized_crop


@register('flip_lr')
def get_flip_lr():
  def flip_lr(features):
    # One draw for all images, the same tf.image.stateless_random_flip_left_right
    # makes, so single-image pipelines give the same flips as before.
    flip = tf.random.stateless_uniform([], _next_seed(features, 'flip_lr')) < 0.5
    for key in _image_keys(features, GEOMETRIC_KEYS):
      features[key] = tf.where(flip, tf.reverse(features[key], [1]), features[key])
    return features
  return flip_lr


@register('color_jitter')
def get_color_jitter(brightness=0.2, contrast=0.2, saturation=0.2):
  """Random brightness shift and contrast/saturation factors in [1-x, 1+x]."""
  def jitter(image, seeds):
    x = tf.cast(image, tf.float32) / 255.0  # tf.image's jitters expect [0, 1].
    if brightness:
      x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
    if contrast:
      x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, seeds[1])
    if saturation:
      x = tf.image.stateless_random_saturation(x, 1 - saturation, 1 + saturation, seeds[2])
    return _like(tf.clip_by_value(x, 0.0, 1.0) * 255.0, image.dtype)

  def color_jitter(features):
    seeds = tf.unstack(tf.random.experimental.stateless_split(
        _next_seed(features, 'color_jitter'), 3))
    for key in _image_keys(features):
      features[key] = jitter(features[key], seeds)
    return features
  return color_jitter


@register('value_range')
def get_value_range(lo=-1.0, hi=1.0, in_min=0.0, in_max=255.0):
  """Maps [in_min, in_max] linearly to [lo, hi] as float32."""
  def value_range(features):
    for key in _image_keys(features):
      x = tf.cast(features[key], tf.float32)
      features[key] = lo + (x - in_min) * ((hi - lo) / (in_max - in_min))
    return features
  return value_range


def _degrade_range(name, value, kind=float):
  """None/0 -> None (off), x -> (x, x), (lo, hi) -> (lo, hi) with 0 <= lo <= hi."""
  if value is None or (isinstance(value, (int, float)) and not value):
    return None
  lo, hi = (value, value) if isinstance(value, (int, float)) else value
  if not 0 <= lo <= hi:
    raise ValueError(f'degrade: {name} needs 0 <= lo <= hi, got {value!r}')
  return kind(lo), kind(hi)


def _uniform(lo, hi, seed):
  """A float in [lo, hi]; no seed needed when lo == hi."""
  if lo == hi:
    return tf.constant(lo, tf.float32)
  return tf.random.stateless_uniform([], seed, lo, hi)


def _sometimes(prob, seed, fn, x):
  """fn(x) with probability `prob`, else x; no seed needed when prob is 1."""
  if prob >= 1:
    return fn(x)
  return tf.cond(tf.random.stateless_uniform([], seed) < prob, lambda: fn(x), lambda: x)


def _gaussian_blur(x, sigma, radius):
  """Separable Gaussian blur of a float HxWxC image; edges mirror like scipy's 'reflect'."""
  # The support is fixed by the largest sigma so shapes stay static when sigma is random.
  offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-0.5 * tf.square(offsets / tf.maximum(sigma, 1e-3)))
  kernel /= tf.reduce_sum(kernel)
  channels = x.shape[-1]
  x = tf.pad(x[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], 'SYMMETRIC')
  for filter_shape in ([-1, 1, 1, 1], [1, -1, 1, 1]):
    depthwise = tf.tile(tf.reshape(kernel, filter_shape), [1, 1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, depthwise, [1, 1, 1, 1], 'VALID')
  return x[0]


@register('degrade')
def get_degrade(resolution=None, blur=None, blur_prob=1.0, noise=None, noise_prob=1.0,
                jpeg=None, jpeg_prob=1.0, upsample='bicubic', downsample='area'):
  """Writes a low-quality copy of 'image' to 'image_lq' (same shape and dtype).

  Models a poor capture: Gaussian blur of sigma `blur` (input pixels), area
  downsampling (`downsample`: 'area' or 'bicubic') to `resolution` px square, Gaussian
  noise of sigma `noise`
  (0-255 units) and JPEG at quality `jpeg`, then `upsample` ('bicubic' or
  'bilinear') back to the input size. Noise and JPEG act at the low
  resolution, as in a low-resolution camera. A (lo, hi) range is drawn
  uniformly per example (a number is fixed), each step happens with its
  probability, and None turns a step off; `resolution` is an int or a list to
  pick from. Values must be in [0, 255]: put degrade before value_range. With
  no random choice the op needs no features['rng'], so it also suits eval
  preprocessing, e.g. 'degrade(resolution=28)'.
  """
  resolutions = [resolution] if isinstance(resolution, int) else list(resolution or [])
  resolutions = [r for r in resolutions if r]
  if not all(isinstance(r, int) and r > 0 for r in resolutions):
    raise ValueError(f'degrade: resolution needs positive ints, got {resolution!r}')
  for name, prob in (('blur_prob', blur_prob), ('noise_prob', noise_prob),
                     ('jpeg_prob', jpeg_prob)):
    if not 0 <= prob <= 1:
      raise ValueError(f'degrade: {name} must be in [0, 1], got {prob!r}')
  if upsample not in ('bicubic', 'bilinear'):
    raise ValueError(f"degrade: upsample must be 'bicubic' or 'bilinear', got {upsample!r}")
  if downsample not in ('area', 'bicubic'):
    raise ValueError(f"degrade: downsample must be 'area' or 'bicubic', got {downsample!r}")
  # Steps that cannot change the image are dropped, so they need no seed either.
  blur = _degrade_range('blur', blur) if blur_prob else None
  noise = _degrade_range('noise', noise) if noise_prob else None
  jpeg = _degrade_range('jpeg', jpeg, int) if jpeg_prob else None
  if jpeg and jpeg[1] > 100:
    raise ValueError(f'degrade: jpeg quality must be in [0, 100], got {jpeg!r}')
  is_random = (len(set(resolutions)) > 1 or noise is not None or any(
      r is not None and (r[0] != r[1] or p < 1)
      for r, p in ((blur, blur_prob), (jpeg, jpeg_prob))))

  def compress(x, seed):
    lo, hi = jpeg
    quality = lo if lo == hi else tf.random.stateless_uniform([], seed, lo, hi + 1, tf.int32)
    x = tf.image.adjust_jpeg_quality(tf.saturate_cast(tf.round(x), tf.uint8), quality)
    return tf.cast(x, tf.float32)

  def degrade(features):
    image = tf.ensure_shape(features['image'], [None, None, 3])
    seeds = [None] * 8
    if is_random:
      seeds = tf.unstack(tf.random.experimental.stateless_split(
          _next_seed(features, 'degrade'), len(seeds)))
    x = tf.cast(image, tf.float32)
    if blur:
      radius = max(1, math.ceil(3 * blur[1]))
      x = _sometimes(blur_prob, seeds[0], lambda x: _gaussian_blur(
          x, _uniform(*blur, seeds[1]), radius), x)
    if resolutions:
      size = (image.shape[:2].as_list() if image.shape[:2].is_fully_defined()
              else tf.shape(image)[:2])
      low = resolutions[0]
      if len(set(resolutions)) > 1:
        low = tf.gather(resolutions, tf.random.stateless_uniform(
            [], seeds[2], 0, len(resolutions), tf.int32))
      x = tf.image.resize(x, tf.stack([low, low]), method=downsample,
                          antialias=downsample == 'bicubic')
    if noise:
      x = _sometimes(noise_prob, seeds[3], lambda x: tf.clip_by_value(
          x + _uniform(*noise, seeds[4]) * tf.random.stateless_normal(tf.shape(x), seeds[5]),
          0.0, 255.0), x)
    if jpeg:
      x = _sometimes(jpeg_prob, seeds[6], lambda x: compress(x, seeds[7]), x)
    if resolutions:
      x = tf.image.resize(x, size, method=upsample)
    # Clipping also removes bicubic overshoot: a real image stays in [0, 255].
    features['image_lq'] = tf.ensure_shape(
        _like(tf.clip_by_value(x, 0.0, 255.0), image.dtype), image.shape)
    return features
  return degrade


@register('keep')
def get_keep(*keys):
  def keep(features):
    return {k: features[k] for k in keys}
  return keep
