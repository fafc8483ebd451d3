"""Preprocessing ops on feature dicts, composed from spec strings (big_vision style).

A spec like "decode|resize(64)|flip_lr|value_range(-1,1)" names registered op
factories; each is called with the literal arguments in parentheses and returns
a function dict -> dict on tf tensors. Ops act on features['image'] and keep
its dtype (uint8 stays uint8, rounded) except `decode` (bytes -> uint8) and
`value_range` (-> float32). Random ops are stateless: they draw from the
per-example seed features['rng'] (shape [2]) and replace it with a fresh one,
so the same seed always gives the same augmentation.
"""

import ast
from typing import Callable

import tensorflow as tf

# tf.data must never grab accelerator memory: JAX owns the GPUs.
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # Devices already initialised.
  pass

Features = dict[str, tf.Tensor]
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


def _resize(image, size):
  size = (size, size) if isinstance(size, int) else tuple(size)
  resized = tf.image.resize(image, size, method='bilinear', antialias=True)
  return _like(resized, image.dtype)


@register('decode')
def get_decode():
  def decode(features):
    # channels=3 turns greyscale into RGB so every dataset has the same shape.
    image = tf.io.decode_image(features['image'], channels=3, expand_animations=False)
    features['image'] = tf.ensure_shape(image, [None, None, 3])
    return features
  return decode


@register('resize')
def get_resize(size):
  def resize(features):
    features['image'] = _resize(features['image'], size)
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
    features['image'] = _resize(tf.slice(image, begin, crop_size), size)
    return features
  return random_resized_crop


@register('flip_lr')
def get_flip_lr():
  def flip_lr(features):
    features['image'] = tf.image.stateless_random_flip_left_right(
        features['image'], seed=_next_seed(features, 'flip_lr'))
    return features
  return flip_lr


@register('color_jitter')
def get_color_jitter(brightness=0.2, contrast=0.2, saturation=0.2):
  """Random brightness shift and contrast/saturation factors in [1-x, 1+x]."""
  def color_jitter(features):
    image = features['image']
    seeds = tf.unstack(tf.random.experimental.stateless_split(
        _next_seed(features, 'color_jitter'), 3))
    x = tf.cast(image, tf.float32) / 255.0  # tf.image's jitters expect [0, 1].
    if brightness:
      x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
    if contrast:
      x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, seeds[1])
    if saturation:
      x = tf.image.stateless_random_saturation(x, 1 - saturation, 1 + saturation, seeds[2])
    features['image'] = _like(tf.clip_by_value(x, 0.0, 1.0) * 255.0, image.dtype)
    return features
  return color_jitter


@register('value_range')
def get_value_range(lo=-1.0, hi=1.0, in_min=0.0, in_max=255.0):
  """Maps [in_min, in_max] linearly to [lo, hi] as float32."""
  def value_range(features):
    x = tf.cast(features['image'], tf.float32)
    features['image'] = lo + (x - in_min) * ((hi - lo) / (in_max - in_min))
    return features
  return value_range


@register('keep')
def get_keep(*keys):
  def keep(features):
    return {k: features[k] for k in keys}
  return keep
