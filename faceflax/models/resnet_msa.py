"""ResNet with dilated-convolution multi-scale attention (MSA) and multi-task heads.

The age-estimation model: a basic-block ResNet trunk (ResNet34 in the paper),
an MSA module after the stages named in ``msa_stages``, and heads on the shared
globally pooled features:
  * age: logits over the integer ages 0..max_age (for the label-distribution
    KL / cross-entropy losses; ``expected_age`` turns them into a prediction),
    and a Gaussian (mean, log sigma) for the Dirac-vs-Gaussian loss;
  * gender (2 logits) and race (5 logits), the auxiliary tasks.
``msa_stages=()`` is the plain ResNet (ablation). ``__call__`` returns a dict:
'age_logits', 'age_mean', 'age_log_sigma' (if 'age' in ``heads``),
'gender_logits', 'race_logits' (if enabled), 'attention' (tuple of the MSA maps,
[B, H, W, 1] each, in trunk order) and 'pooled'. BatchNorm statistics live in the
'batch_stats' collection: train with ``mutable=['batch_stats']``.
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

HEADS = ('age', 'gender', 'race')
NUM_GENDERS = 2
NUM_RACES = 5


def _batch_norm(train: bool, **kwargs):
  # Statistics are reduced in fp32 whatever the compute dtype (flax's default).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **kwargs)


def dilated_receptive_field(rates: Sequence[int], kernel: int = 3) -> int:
  """Side of the receptive field of cascaded `kernel`-sized convolutions with `rates`."""
  return 1 + (kernel - 1) * sum(rates)


def max_pool(x, window: int, stride: int, pad: int):
  """``nn.max_pool`` (NHWC, square window, ``pad`` pixels of -inf on every side) computed
  as a max over the window's rows, then over its columns, each the maximum of strided
  slices.

  Same values; its gradient is elementwise selects: 5.5 ms for the age stem's pool (fwd +
  bwd, batch 64, 40x40x32) against 31 ms for XLA:CPU's reduce-window and the
  select-and-scatter of its gradient, which took ~15% of the age train step. Where inputs
  tie for the maximum the gradient is shared between them instead of going to one; after a
  ReLU the ties are zeros, whose share the ReLU drops either way.
  """
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  for axis in (1, 2):
    out = (x.shape[axis] - window) // stride + 1
    taps = [lax.slice_in_dim(x, i, i + (out - 1) * stride + 1, stride, axis)
            for i in range(window)]
    x = functools.reduce(jnp.maximum, taps)
  return x


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(_batch_norm, train, dtype=self.dtype)
    y = conv(self.features, (3, 3), self.strides, padding=1, name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.features, (3, 3), padding=1, name='conv2')(y)
    # Zero-initialised last scale: every block starts as the identity (Goyal et al. 2017).
    y = norm(scale_init=nn.initializers.zeros, name='bn2')(y)
    if x.shape != y.shape:
      x = conv(self.features, (1, 1), self.strides, name='proj')(x)
      x = norm(name='proj_bn')(x)
    return nn.relu(x + y)


class MultiScaleAttention(nn.Module):
  """Spatial attention from cascaded 3x3 dilated convolutions (the MSA module).

  A 1x1 convolution reduces the channels, then 3x3 convolutions with dilation
  `rates` are applied in cascade and the output of every step is kept: step i
  sees a (1 + 2 * sum(rates[:i+1]))-pixel square (3, 7, 17 for (1, 2, 5)). The
  cascade is what hybrid dilated convolution (Wang et al. 2018) relies on:
  rates without a common factor > 1 make the stacked receptive field dense,
  whereas a lone rate-5 convolution (a parallel branch) only reads every fifth
  pixel ("gridding"). The steps are concatenated, fused by a 1x1 convolution to
  one channel and squashed by a sigmoid into a map a in (0, 1).

  The features are re-weighted as x * (1 + a) (residual attention, Wang et al.
  2017), not x * a: a plain mask can only attenuate, so stacked modules shrink
  the signal and a near-zero map would cut the gradient to the trunk below;
  with the identity term, a re-weights without ever erasing features. The
  fusion starts at zero, so a new module is a uniform gain of 1.5 that the next
  BatchNorm absorbs: inserting it does not perturb the trunk at initialisation.
  Returns (re-weighted features, attention map [B, H, W, 1]).
  """
  rates: Sequence[int] = (1, 2, 5)
  reduction: int = 4  # Channels inside the module = input channels // reduction.
  min_channels: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not self.rates:
      raise ValueError('MultiScaleAttention needs at least one dilation rate')
    channels = max(x.shape[-1] // self.reduction, self.min_channels)
    y = nn.Conv(channels, (1, 1), use_bias=False, dtype=self.dtype, name='reduce')(x)
    y = nn.relu(_batch_norm(train, dtype=self.dtype, name='reduce_bn')(y))
    steps = []
    for i, rate in enumerate(self.rates):
      y = nn.Conv(channels, (3, 3), padding=rate, kernel_dilation=rate, use_bias=False,
                  dtype=self.dtype, name=f'dilated{i}')(y)
      y = nn.relu(_batch_norm(train, dtype=self.dtype, name=f'dilated{i}_bn')(y))
      steps.append(y)
    logits = nn.Conv(1, (1, 1), kernel_init=nn.initializers.zeros, dtype=self.dtype, name='fuse')(
        jnp.concatenate(steps, axis=-1))
    attention = nn.sigmoid(logits.astype(jnp.float32))
    return x * (1 + attention).astype(x.dtype), attention


class ResNetMSA(nn.Module):
  """Basic-block ResNet trunk, optional MSA modules and age / gender / race heads."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  stem_pool: bool = True            # 3x3/2 max-pool after the 7x7/2 stem convolution.
  # Stage indices (0-based) followed by an MSA. At 224 px stages 1 and 2 give
  # 28 and 14 px maps; stage 3's 7 px map is smaller than the 17 px receptive
  # field of rates (1, 2, 5), whose rate-5 step would mostly read padding there.
  msa_stages: Sequence[int] = (1, 2)
  msa_rates: Sequence[int] = (1, 2, 5)
  msa_reduction: int = 4
  heads: Sequence[str] = HEADS
  max_age: int = 116                # Age logits cover the integer ages 0..max_age.
  init_log_sigma: float = math.log(3.0)  # Initial spread of the Gaussian age head.
  dropout: float = 0.0              # On the pooled features, before the heads.
  image_size: int = 224             # The preset's input size; the network takes any size.
  dtype: Any = jnp.float32          # Compute dtype; parameters, statistics and heads stay fp32.

  @property
  def num_ages(self) -> int:
    return self.max_age + 1

  def _check_config(self):
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f'stage_sizes {tuple(self.stage_sizes)} and widths '
                       f'{tuple(self.widths)} must have the same length')
    bad = [s for s in self.msa_stages if not 0 <= s < len(self.stage_sizes)]
    if bad:
      raise ValueError(f'msa_stages {tuple(self.msa_stages)}: {bad} not in '
                       f'0..{len(self.stage_sizes) - 1}')
    unknown = set(self.heads) - set(HEADS)
    if unknown:
      raise ValueError(f'unknown heads {sorted(unknown)}; known: {HEADS}')

  @nn.compact
  def __call__(self, images, train: bool = False):
    self._check_config()
    x = nn.Conv(self.stem_width, (7, 7), 2, padding=3, use_bias=False, dtype=self.dtype,
                name='stem')(images)
    x = nn.relu(_batch_norm(train, dtype=self.dtype, name='stem_bn')(x))
    if self.stem_pool:
      x = max_pool(x, 3, 2, 1)
    attention = []
    for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, self.dtype, name=f'stage{stage}_block{block}')(x, train)
      if stage in self.msa_stages:
        x, a = MultiScaleAttention(self.msa_rates, self.msa_reduction, dtype=self.dtype,
                                   name=f'msa{stage}')(x, train)
        attention.append(a)

    pooled = x.astype(jnp.float32).mean(axis=(1, 2))  # the heads run in fp32
    features = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    out = {'attention': tuple(attention), 'pooled': pooled}
    if 'age' in self.heads:
      out['age_logits'] = nn.Dense(self.num_ages, name='age')(features).astype(jnp.float32)
      gaussian = nn.Dense(2, kernel_init=nn.initializers.zeros,
                          bias_init=self._gaussian_bias_init, name='age_gaussian')(features)
      gaussian = gaussian.astype(jnp.float32)
      # The sigmoid keeps the mean inside 0..max_age, where the discretised
      # Gaussian always has mass.
      out['age_mean'] = self.max_age * nn.sigmoid(gaussian[:, 0])
      out['age_log_sigma'] = gaussian[:, 1]
    if 'gender' in self.heads:
      out['gender_logits'] = nn.Dense(NUM_GENDERS, name='gender')(features).astype(jnp.float32)
    if 'race' in self.heads:
      out['race_logits'] = nn.Dense(NUM_RACES, name='race')(features).astype(jnp.float32)
    return out

  def _gaussian_bias_init(self, key, shape, dtype=jnp.float32):
    """Starts the Gaussian head at mean max_age / 3 (a typical adult) and init_log_sigma."""
    del key
    mean_logit = math.log(1 / 2)  # sigmoid^-1(1/3)
    return jnp.asarray([mean_logit, self.init_log_sigma], dtype).reshape(shape)


# Named presets (big_vision style): the config names one, then may override fields.
VARIANTS = {
    'resnet34': dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64,
                     image_size=224),
    # CPU-sized: ResNet18 depth at half width on 80 px faces. Its stage maps are
    # 20, 10, 5, 3 px, so the MSAs go after stages 0 and 1, where the maps (20,
    # 10) are close to those the paper's placement sees at 224 px (28, 14); on a
    # 5 px map the rate-5 step would read only padding. (64 px is no faster on
    # XLA:CPU: its 16 px maps run at a fraction of the conv throughput.)
    'small': dict(stage_sizes=(2, 2, 2, 2), widths=(32, 64, 128, 256), stem_width=32,
                  msa_stages=(0, 1), image_size=80),
    'test': dict(stage_sizes=(1, 1), widths=(8, 16), stem_width=8, stem_pool=False,
                 msa_stages=(1,), msa_reduction=2, image_size=32),
}


def make(variant: str, **overrides) -> ResNetMSA:
  if variant not in VARIANTS:
    raise ValueError(f'unknown ResNet-MSA variant {variant!r}; known: {sorted(VARIANTS)}')
  return functools.partial(ResNetMSA, **VARIANTS[variant])(**overrides)


def parse_heads(value) -> tuple[str, ...]:
  """A config's ``model.heads`` as names; also accepts one 'age,gender' string (a shell
  override). The age head is required."""
  value = (value,) if isinstance(value, str) else tuple(value)
  names = tuple(n.strip() for v in value for n in str(v).split(',') if n.strip())
  unknown = [n for n in names if n not in HEADS]
  if unknown:
    raise ValueError(f'model.heads: unknown head(s) {unknown}; allowed: {", ".join(HEADS)}')
  if 'age' not in names:
    raise ValueError(f'model.heads={names}: the age head is required (allowed: '
                     f'{", ".join(HEADS)})')
  return tuple(dict.fromkeys(names))


def from_config(model_config, image_size: int, dtype=jnp.float32) -> ResNetMSA:
  """The network of a config's model dict (``variant`` + overrides); ``dtype``: compute dtype."""
  m = model_config
  return make(m.variant, msa_stages=tuple(m.msa_stages), msa_rates=tuple(m.msa_rates),
              heads=parse_heads(m.heads), max_age=m.max_age, dropout=m.dropout,
              image_size=image_size, dtype=dtype)


def init_variables(model: ResNetMSA, rng, size: int) -> dict:
  """Parameters and BatchNorm statistics, initialised on a 64 px face at most: the heads
  read mean-pooled features, so no variable depends on the image size, and start-up traces
  and compiles a small forward pass instead of the training one."""
  size = min(size, 64)
  return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, size, size, 3)))
