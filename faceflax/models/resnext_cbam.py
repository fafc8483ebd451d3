"""ResNeXt with CBAM attention in every block, for face recognition.

Each ResNeXt bottleneck (Xie et al. 2017: a grouped 3x3 convolution between
two 1x1 convolutions) refines its residual branch with CBAM (Woo et al. 2018),
channel attention then spatial attention, before the residual addition. A
face-recognition stem (one 3x3 convolution, no max-pool) and the insightface
BN-Dropout-FC-BN head map 112x112 aligned faces in [-1, 1] to an embedding
(not normalised: callers L2-normalise).

``__call__`` also returns every stage's last channel and spatial attention
maps, so a student can be taught where its teacher looks (attention transfer).
With ``attention=False`` (the ablation) the blocks have no CBAM and both map
tuples are empty: there is no attention to transfer, and all-ones maps would
make an attention-transfer loss silently zero.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from faceflax.models import heads


def per_group_conv(lhs, rhs, window_strides, padding, *args, dimension_numbers=None,
                   feature_group_count: int = 1, **kwargs):
  """``lax.conv_general_dilated`` computed as one dense convolution per group, or, on maps
  smaller than the kernel's window, as one batched matmul over the window's patches.

  Same result and kernel layout as the grouped convolution; on CPU, XLA takes tens of times
  longer for a grouped convolution's kernel gradient than for these G dense ones (3.8 s vs
  0.09 s for a 28x28x128, 8-group layer, batch 32). On the smallest maps (2x2 out of a 3x3
  window: the last stage of the CPU presets) XLA's dense convolutions are slow in turn and
  the matmul takes a quarter of their time (fwd + bwd, 12 vs 52 ms per step).
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if feature_group_count == 1:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args,
                                    dimension_numbers=dn, **kwargs)
  if _as_patch_matmul(lhs, rhs, window_strides, padding, dn, args, kwargs):
    return _grouped_patch_matmul(lhs, rhs, window_strides, padding, feature_group_count,
                                 kwargs.get('precision'))
  outs = [lax.conv_general_dilated(l, r, window_strides, padding, *args, dimension_numbers=dn,
                                   **kwargs)
          for l, r in zip(jnp.split(lhs, feature_group_count, axis=dn.lhs_spec[1]),
                          jnp.split(rhs, feature_group_count, axis=dn.rhs_spec[0]))]
  return jnp.concatenate(outs, axis=dn.out_spec[1])


NHWC_HWIO = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ('NHWC', 'HWIO', 'NHWC'))


def _as_patch_matmul(lhs, rhs, strides, padding, dn, args, kwargs) -> bool:
  """Whether the output map has fewer pixels than the kernel's window (NHWC / HWIO, explicit
  padding, no dilation: what nn.Conv passes here)."""
  dilations = (*args[:2], kwargs.get('lhs_dilation'), kwargs.get('rhs_dilation'))
  dilated = any(d is not None and tuple(d) != (1, 1) for d in dilations)
  if dn != NHWC_HWIO or isinstance(padding, str) or dilated:
    return False
  kh, kw = rhs.shape[:2]
  out = [(lhs.shape[i + 1] + sum(padding[i]) - rhs.shape[i]) // strides[i] + 1 for i in (0, 1)]
  return out[0] * out[1] < kh * kw


def _grouped_patch_matmul(lhs, rhs, strides, padding, groups: int, precision=None):
  """NHWC / HWIO grouped convolution as a matmul per group over the window's patches."""
  kh, kw, group_in, out_channels = rhs.shape
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  n, h, w, c = x.shape
  out_h, out_w = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
  taps = [lax.slice(x, (0, i, j, 0),
                    (n, i + (out_h - 1) * strides[0] + 1, j + (out_w - 1) * strides[1] + 1, c),
                    (1, strides[0], strides[1], 1))
          for i in range(kh) for j in range(kw)]
  patches = jnp.stack(taps, axis=3).reshape(n, out_h, out_w, kh * kw, groups, group_in)
  kernel = rhs.reshape(kh * kw, group_in, groups, out_channels // groups)
  out = jnp.einsum('nhwkgc,kcgo->nhwgo', patches, kernel, precision=precision)
  return out.reshape(n, out_h, out_w, out_channels)


def _grouped_conv_fn(kind: str):
  """The ``conv_general_dilated`` for nn.Conv; None is XLA's native grouped convolution."""
  if kind not in ('auto', 'native', 'per_group'):
    raise ValueError(f"grouped_conv={kind!r}: expected 'auto', 'native' or 'per_group'")
  if kind == 'per_group' or (kind == 'auto' and jax.default_backend() == 'cpu'):
    return per_group_conv
  return None


class PReLU(nn.Module):
  """Per-channel PReLU as in insightface; slopes start at 0.25 (He et al. 2015)."""

  @nn.compact
  def __call__(self, x):
    slope = self.param('slope', nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def _activation(kind: str):
  if kind == 'prelu':
    return lambda x: PReLU()(x)
  if kind == 'relu':
    return nn.relu
  raise ValueError(f"activation={kind!r}: expected 'prelu' or 'relu'")


def _batch_norm(train: bool, dtype, **kwargs):
  # PyTorch defaults (momentum 0.1, eps 1e-5), which the face-recognition recipes are tuned with.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      **kwargs)


class CBAM(nn.Module):
  """Channel then spatial attention; returns (refined x, channel [B,C], spatial [B,H,W])."""
  reduction: int = 16
  spatial_kernel: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    # Average- and max-pooled descriptors go through one shared MLP and are summed.
    pooled = jnp.stack([x.mean(axis=(1, 2)), x.max(axis=(1, 2))])
    hidden = nn.relu(nn.Dense(max(c // self.reduction, 1), dtype=self.dtype, name='mlp_in')(pooled))
    channel = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name='mlp_out')(hidden).sum(axis=0))
    x = x * channel[:, None, None, :]
    descriptor = jnp.concatenate([x.mean(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)],
                                 axis=-1)
    k = self.spatial_kernel
    spatial = nn.Conv(1, (k, k), padding='SAME', dtype=self.dtype, name='spatial')(descriptor)
    spatial = nn.sigmoid(spatial)[..., 0]
    return x * spatial[..., None], channel, spatial


class Bottleneck(nn.Module):
  """ResNeXt block: 1x1 -> grouped 3x3 (strided) -> 1x1, CBAM on the residual branch."""
  width: int                        # of the grouped convolution
  out_width: int
  cardinality: int
  strides: int = 1
  attention: bool = True
  reduction: int = 16
  spatial_kernel: int = 7
  activation: str = 'prelu'
  grouped_conv: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(_batch_norm, train, self.dtype)
    act = _activation(self.activation)
    y = act(norm()(conv(self.width, (1, 1))(x)))
    y = conv(self.width, (3, 3), self.strides, padding=1, feature_group_count=self.cardinality,
             conv_general_dilated=_grouped_conv_fn(self.grouped_conv))(y)
    y = act(norm()(y))
    y = norm()(conv(self.out_width, (1, 1))(y))
    maps = None
    if self.attention:
      y, channel, spatial = CBAM(self.reduction, self.spatial_kernel, self.dtype, name='cbam')(y)
      maps = (channel, spatial)
    if self.strides != 1 or x.shape[-1] != self.out_width:
      x = norm(name='proj_norm')(conv(self.out_width, (1, 1), self.strides, name='proj')(x))
    return act(y + x), maps


class EmbeddingHead(nn.Module):
  """insightface BN-Dropout-FC-BN: the flattened map keeps the face's spatial layout."""
  embed_dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = _batch_norm(train, x.dtype, name='map_norm')(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    # In fp32 like insightface's fp16 recipe: the wide FC sums H*W*C products.
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    x = nn.Dense(self.embed_dim, name='dense')(x)
    return _batch_norm(train, jnp.float32, use_scale=False, name='embed_norm')(x)


class ResNeXtCBAM(nn.Module):
  """ResNeXt-CBAM embedding network (defaults: ResNeXt-50 32x4d at 112 px -> 7x7)."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  cardinality: int = 32
  bottleneck_width: int = 4         # per-group width of the first stage; doubles every stage
  expansion: int = 2                # block output width / grouped width (ResNeXt: 2)
  stem_width: int = 64
  stem_stride: int = 1
  embed_dim: int = 512
  dropout: float = 0.0
  attention: bool = True
  reduction: int = 16
  spatial_kernel: int = 7
  activation: str = 'prelu'         # 'prelu' | 'relu'
  grouped_conv: str = 'auto'        # 'native' | 'per_group' | 'auto': per_group on CPU
  dtype: Any = jnp.float32          # compute dtype; parameters stay fp32

  def stage_widths(self) -> tuple[int, ...]:
    """Output channels of every stage."""
    return tuple(self.expansion * self.cardinality * self.bottleneck_width * 2 ** i
                 for i in range(len(self.stage_sizes)))

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(self.stem_width, (3, 3), self.stem_stride, padding=1, use_bias=False,
                dtype=self.dtype, name='stem_conv')(images.astype(self.dtype))
    x = _activation(self.activation)(_batch_norm(train, self.dtype, name='stem_norm')(x))
    channel_maps, spatial_maps = [], []
    for i, (num_blocks, out_width) in enumerate(zip(self.stage_sizes, self.stage_widths())):
      for j in range(num_blocks):
        x, maps = Bottleneck(
            out_width // self.expansion, out_width, self.cardinality,
            2 if j == 0 else 1, self.attention, self.reduction, self.spatial_kernel,
            self.activation, self.grouped_conv, self.dtype, name=f'stage{i}_block{j}')(x, train)
      if self.attention:
        channel_maps.append(maps[0].astype(jnp.float32))
        spatial_maps.append(maps[1].astype(jnp.float32))
    embedding = EmbeddingHead(self.embed_dim, self.dropout, name='head')(x, train)
    return {'embedding': embedding, 'channel_attention': tuple(channel_maps),
            'spatial_attention': tuple(spatial_maps)}


# Named presets: the config names one, then may override fields.
VARIANTS = {
    # The paper's backbone: widths 256/512/1024/2048, 112 -> 56 -> 28 -> 14 -> 7.
    'resnext50_32x4d': dict(stage_sizes=(3, 4, 6, 3), cardinality=32, bottleneck_width=4,
                            stem_width=64, stem_stride=1, embed_dim=512),
    # CPU-sized: 0.39 GFLOPs/image; 112 -> 56 (stem) -> 28 -> 14 -> 7 -> 4, widths 128..1024.
    'small': dict(stage_sizes=(2, 2, 2, 2), cardinality=8, bottleneck_width=8, stem_width=32,
                  stem_stride=2, embed_dim=256),
    # 'small''s widths and map sizes with half the blocks, so its attention maps match 'small''s.
    'student': dict(stage_sizes=(1, 1, 1, 1), cardinality=8, bottleneck_width=8, stem_width=32,
                    stem_stride=2, embed_dim=256),
    # Milliseconds; use small images (32 px -> 16 -> 8 -> 4 -> 2).
    'test': dict(stage_sizes=(1, 1, 1), cardinality=2, bottleneck_width=2, stem_width=8,
                 stem_stride=2, embed_dim=16, reduction=4, spatial_kernel=3),
}


def make(variant: str, **overrides) -> ResNeXtCBAM:
  if variant not in VARIANTS:
    raise ValueError(f'unknown ResNeXt-CBAM variant {variant!r}; known: {sorted(VARIANTS)}')
  return functools.partial(ResNeXtCBAM, **VARIANTS[variant])(**overrides)


class Recognizer(nn.Module):
  """Backbone embedding plus an ArcFace classifier over the training identities."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    out = dict(self.backbone(images, train=train))
    out['cosine'] = heads.ArcFaceHead(self.num_classes, name='arcface')(out['embedding'])
    return out


def recognizer(model_config, num_classes: int, dtype=jnp.float32) -> Recognizer:
  """The ``Recognizer`` of a config's model dict (``variant`` + overrides) over
  ``num_classes`` identities; ``dtype``: compute dtype (``precision.compute_dtype``)."""
  kwargs = dict(model_config)
  return Recognizer(make(kwargs.pop('variant'), dtype=dtype, **kwargs), num_classes)


def init_variables(model: nn.Module, rng, size: int) -> dict:
  """Parameters and BatchNorm statistics of ``model`` on a ``size`` px face."""
  return model.init({'params': rng, 'dropout': rng}, jnp.zeros((1, size, size, 3)))
