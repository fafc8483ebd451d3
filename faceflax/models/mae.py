"""Masked autoencoder ViT with an optional multi-scale convolution stem.

One class serves the FBP teacher (``stem='multiscale'``) and the student
(``stem='patch'``); presets are ``functools.partial`` of it (see ``VARIANTS``).
Methods:
  * ``__call__(images)``: the full (unmasked) encoder, mean-pooled, and a score
    head; returns logits over score bins, the score and the per-layer tokens.
  * ``pretrain(images)``: random masking, encoder on visible tokens, a light
    decoder that predicts every patch's pixels (MAE, He et al. 2022).

``dtype`` is the compute dtype of the convolutions, matmuls and attention
(parameters stay fp32); LayerNorm, the attention softmax, the residual stream
and the score head stay fp32. ``param_axes`` gives the logical axes of the MLP
kernels for splitting them over a 'model' mesh axis.
"""
import functools
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from faceflax.models import heads


def sincos_pos_embed(grid: int, width: int) -> np.ndarray:
  """Fixed 2D sine-cosine position embedding, [grid*grid, width]."""
  assert width % 4 == 0, width
  omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
  ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  out = [fn(np.outer(c.ravel(), omega)) for c in (ys, xs) for fn in (np.sin, np.cos)]
  return np.concatenate(out, axis=1).astype(np.float32)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  return einops.rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)', p=patch, q=patch)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
  grid = int(round(patches.shape[1] ** 0.5))
  return einops.rearrange(patches, 'b (h w) (p q c) -> b (h p) (w q) c',
                          h=grid, p=patch, q=patch, c=channels)


def random_masking(rng: jax.Array, batch: int, tokens: int, mask_ratio: float,
                   priority: jax.Array | None = None):
  """Per-example random permutation; returns (keep_idx [B,K], mask [B,N] 1=masked).

  ``priority`` [B, N] (optional, >= 0) is added to the uniform noise: tokens
  with priority >= 1 are masked before any other (e.g. a whole facial component).
  """
  num_keep = int(round(tokens * (1 - mask_ratio)))
  noise = jax.random.uniform(rng, (batch, tokens))
  if priority is not None:
    noise = noise + priority
  order = jnp.argsort(noise, axis=1)
  keep_idx = order[:, :num_keep]
  mask = jnp.ones((batch, tokens)).at[jnp.arange(batch)[:, None], keep_idx].set(0.0)
  return keep_idx, mask


def _axes(init, names, annotate: bool):
  """``init`` tagged with logical axis names (boxed params) when ``annotate``."""
  return nn.with_logical_partitioning(init, names) if annotate else init


class MlpBlock(nn.Module):
  """Megatron-style: the hidden ('mlp') axis is the one a 'model' mesh axis splits."""
  mlp_dim: int
  dtype: Any = jnp.float32
  annotate: bool = False  # logical axes on the params (for param_axes only)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    xavier, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros
    x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype,
                         kernel_init=_axes(xavier, ('embed', 'mlp'), self.annotate),
                         bias_init=_axes(zeros, ('mlp',), self.annotate))(x))
    return nn.Dense(d, dtype=self.dtype,
                    kernel_init=_axes(xavier, ('mlp', 'embed'), self.annotate))(x)


def fused_attention(query, key, value, mask=None, dtype=None):
  """softmax(q k^T / sqrt(d)) v through ``jax.nn.dot_product_attention``: cuDNN's fused (flash)
  kernel on NVIDIA GPUs where it applies, XLA's composition elsewhere; the logits and the
  softmax in fp32 either way. A drop-in ``attention_fn`` for flax's attention module (no
  attention-weight dropout: the ViTs here have none)."""
  out = jax.nn.dot_product_attention(query, key, value, mask=mask)
  return out.astype(dtype or query.dtype)


ATTENTION = {'fused': fused_attention, 'flax': nn.dot_product_attention}

# Rematerialisation of each encoder block in the backward pass: 'none' keeps every
# activation; 'block' keeps only the blocks' inputs and recomputes the rest (about one more
# forward pass, the least memory); 'dots' keeps the matmul outputs and recomputes the cheap
# elementwise ops (LayerNorm, GELU, softmax) between them.
REMAT = {'none': None, 'block': jax.checkpoint_policies.nothing_saveable,
         'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_class(remat: str):
  """EncoderBlock, wrapped in ``nn.remat`` with the policy of ``remat`` (REMAT)."""
  if REMAT[remat] is None:
    return EncoderBlock
  # static_argnums: `train` (argument 2, counting self) selects Python branches (dropout)
  return nn.remat(EncoderBlock, policy=REMAT[remat], static_argnums=(2,))


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  annotate: bool = False
  attention: str = 'fused'  # 'fused' | 'flax' (flax's own, which materialises the weights)

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.LayerNorm(dtype=jnp.float32)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform(),
        dtype=self.dtype, force_fp32_for_softmax=True,
        attention_fn=ATTENTION[self.attention])(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = MlpBlock(self.mlp_ratio * x.shape[-1], self.dtype,
                 self.annotate)(nn.LayerNorm(dtype=jnp.float32)(x))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Transformer(nn.Module):
  """Pre-norm transformer; returns the final (normed) tokens and every block's output."""
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  annotate: bool = False
  attention: str = 'fused'
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = []
    x = x.astype(jnp.float32)  # the residual stream stays fp32
    block = block_class(self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, self.annotate,
                       self.attention, name=f'block{i}')(x, train)
      hidden.append(x)
    return nn.LayerNorm(dtype=jnp.float32, name='norm')(x), hidden


class PatchStem(nn.Module):
  """Plain ViT patchify: one strided convolution."""
  width: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding='VALID',
                dtype=self.dtype)(images)
    return einops.rearrange(x, 'b h w c -> b (h w) c')


class MultiScaleStem(nn.Module):
  """Parallel convolutions with different receptive fields, fused, then patchified.

  Branch k sees a k x k neighbourhood, so the tokens mix fine texture (skin)
  with larger structures (eyes, mouth) before attention starts.
  """
  width: int
  patch: int
  channels: int = 24
  kernels: Sequence[int] = (3, 5, 7)
  stride: int = 2  # space-to-depth before the branches: 4x cheaper, receptive fields x2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    if self.patch % self.stride:
      raise ValueError(f'patch={self.patch} must be divisible by stem stride={self.stride}')
    x = einops.rearrange(images, 'b (h p) (w q) c -> b h w (p q c)', p=self.stride, q=self.stride)
    branches = [nn.gelu(nn.Conv(self.channels, (k, k), dtype=self.dtype, name=f'branch{k}')(x))
                for k in self.kernels]
    x = jnp.concatenate(branches, axis=-1)
    x = nn.gelu(nn.Conv(2 * self.channels, (1, 1), dtype=self.dtype, name='fuse')(x))
    return PatchStem(self.width, self.patch // self.stride, self.dtype, name='patchify')(x)


class MAE(nn.Module):
  """ViT masked autoencoder with a score head (for regression / distillation)."""
  image_size: int = 64
  patch: int = 8
  width: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_ratio: int = 4
  stem: str = 'patch'               # 'patch' | 'multiscale'
  stem_channels: int = 24
  stem_kernels: Sequence[int] = (3, 5, 7)
  stem_stride: int = 2
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  mask_ratio: float = 0.75
  num_bins: int = 9                 # score head: logits over score bins
  score_range: Sequence[float] = (1.0, 5.0)
  dropout: float = 0.0
  dtype: Any = jnp.float32          # compute dtype (config.train.precision)
  annotate: bool = False            # boxed params with logical axes (see param_axes)
  attention: str = 'fused'          # ATTENTION: 'fused' (jax.nn.dot_product_attention) | 'flax'
  remat: str = 'none'               # REMAT: 'none' | 'block' | 'dots' (encoder and decoder blocks)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch

  def setup(self):
    if self.image_size % self.patch:
      raise ValueError(f'image_size={self.image_size} is not divisible by patch={self.patch}')
    if self.stem == 'multiscale':
      self.embed = MultiScaleStem(self.width, self.patch, self.stem_channels, self.stem_kernels,
                                  self.stem_stride, self.dtype)
    elif self.stem == 'patch':
      self.embed = PatchStem(self.width, self.patch, self.dtype)
    else:
      raise ValueError(f"model.stem={self.stem!r}: expected 'patch' or 'multiscale'")
    self.pos_embed = sincos_pos_embed(self.grid, self.width)[None]
    if self.attention not in ATTENTION:
      raise ValueError(f'model.attention={self.attention!r}: expected one of {sorted(ATTENTION)}')
    if self.remat not in REMAT:
      raise ValueError(f'model.remat={self.remat!r}: expected one of {sorted(REMAT)}')
    self.encoder = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.dropout,
                               self.dtype, self.annotate, self.attention, self.remat)
    self.head = heads.BinnedScoreHead(self.num_bins, tuple(self.score_range))
    self.decoder_embed = nn.Dense(self.decoder_width, dtype=self.dtype)
    self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.decoder_width))
    self.decoder_pos_embed = sincos_pos_embed(self.grid, self.decoder_width)[None]
    self.decoder = Transformer(self.decoder_depth, self.decoder_heads, self.mlp_ratio,
                               dtype=self.dtype, annotate=self.annotate,
                               attention=self.attention, remat=self.remat)
    self.decoder_pred = nn.Dense(self.patch * self.patch * 3, dtype=self.dtype)

  def tokens(self, images, train: bool = False):
    """Encoder tokens of the unmasked image: (final [B,N,D], per-block list)."""
    return self.encoder(self.embed(images) + self.pos_embed, train)

  def __call__(self, images, train: bool = False):
    tokens, hidden = self.tokens(images, train)
    logits, score = self.head(tokens.mean(axis=1), train)
    return {'logits': logits, 'score': score, 'hidden': hidden, 'pooled': tokens.mean(axis=1)}

  def pretrain(self, images, train: bool = True, mask_priority=None):
    """MAE forward on a random masking (``random_masking``'s ``priority`` steers it).

    Returns predicted and target patches, the mask (1 = masked), the encoder's
    visible tokens ('latent', at 'keep_idx') and the decoder's tokens ('decoded').
    """
    b = images.shape[0]
    n = self.grid * self.grid
    keep_idx, mask = random_masking(self.make_rng('mask'), b, n, self.mask_ratio, mask_priority)
    if self.stem == 'multiscale':
      # Zero masked patches in pixel space first: convolutions would otherwise
      # leak the border pixels of masked patches into visible tokens.
      pixel_mask = unpatchify(jnp.repeat(mask[..., None], self.patch ** 2 * 3, -1), self.patch)
      x = self.embed(images * (1 - pixel_mask))
    else:
      x = self.embed(images)
    x = x + self.pos_embed
    visible = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
    latent, _ = self.encoder(visible, train)

    y = self.decoder_embed(latent)
    full = jnp.broadcast_to(self.mask_token, (b, n, self.decoder_width))
    full = full.at[jnp.arange(b)[:, None], keep_idx].set(y)
    y, _ = self.decoder(full + self.decoder_pos_embed, train)
    pred = self.decoder_pred(y)
    return {'pred': pred, 'target': patchify(images, self.patch), 'mask': mask,
            'latent': latent, 'keep_idx': keep_idx, 'decoded': y}

  def init_all(self, images):
    """Touches every submodule so one init creates all parameters."""
    return self(images), self.pretrain(images)


def param_axes(model: MAE, image_size: int):
  """Logical axes of every parameter (PartitionSpecs of names; P() = none), params' tree."""
  annotated = model.clone(annotate=True)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  rngs = {'params': jax.random.key(0), 'mask': jax.random.key(1)}
  boxed = jax.eval_shape(lambda: annotated.init(rngs, x, method=MAE.init_all))
  return nn.get_partition_spec(boxed)['params']


# Named presets (big_vision style): the config names one, then may override fields.
VARIANTS = {
    'test': dict(width=32, depth=2, num_heads=2, decoder_width=32, decoder_depth=1,
                 decoder_heads=2, stem_channels=8),
    'tiny': dict(width=128, depth=4, num_heads=4, decoder_width=96, decoder_depth=1, decoder_heads=4),
    'small': dict(width=192, depth=6, num_heads=3, decoder_width=128, decoder_depth=2, decoder_heads=4),
    'base': dict(width=768, depth=12, num_heads=12, decoder_width=512, decoder_depth=8, decoder_heads=16),
}


def make(variant: str, **overrides) -> MAE:
  if variant not in VARIANTS:
    raise ValueError(f'unknown MAE variant {variant!r}; known: {sorted(VARIANTS)}')
  return functools.partial(MAE, **VARIANTS[variant])(**overrides)


def from_config(model_config, image_size: int, dtype=jnp.float32) -> MAE:
  """The MAE of a config's model dict (``variant`` + field overrides) at ``image_size``;
  ``dtype``: the compute dtype (``precision.compute_dtype(config.train)``)."""
  kwargs = {k: v for k, v in model_config.to_dict().items() if k != 'variant'}
  return make(model_config.variant, image_size=image_size, dtype=dtype, **kwargs)


def init_params(model: MAE, rng, image_size: int):
  """Every parameter of ``model`` (encoder, head and decoder).

  Initialised through a 4x4-token copy of the model: no parameter's shape or value depends
  on the image size (the position embeddings are constants, each parameter's random stream
  follows its name), and init then traces and compiles a forward pass of 16 tokens instead
  of the training one (start-up; on accelerators, convolution autotuning at full size).
  """
  size = min(image_size, 4 * model.patch)
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  rngs = {'params': rng, 'mask': jax.random.fold_in(rng, 1), 'dropout': jax.random.fold_in(rng, 2)}
  return model.clone(image_size=size).init(rngs, x, method=model.init_all)['params']


def layer_id(path: str, depth: int) -> int:
  """Layer index for layer-wise lr decay: stem 0, block i -> i + 1, head depth + 1."""
  if path.startswith('embed') or 'mask_token' in path:
    return 0
  if path.startswith('encoder/block'):
    return int(path.split('/')[1][len('block'):]) + 1
  return depth + 1
