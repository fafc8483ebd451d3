"""Masked autoencoder ViT with an optional multi-scale convolution stem.

One class serves the FBP teacher (``stem='multiscale'``) and the student
(``stem='patch'``); presets are ``functools.partial`` of it (see ``VARIANTS``).
Methods:
  * ``__call__(images)``: the full (unmasked) encoder, mean-pooled, and a score
    head; returns logits over score bins, the score and the per-layer tokens.
  * ``pretrain(images)``: random masking, encoder on visible tokens, a light
    decoder that predicts every patch's pixels (MAE, He et al. 2022).
"""
import functools
from typing import Sequence

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


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform())(x))
    return nn.Dense(d, kernel_init=nn.initializers.xavier_uniform())(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = MlpBlock(self.mlp_ratio * x.shape[-1])(nn.LayerNorm()(x))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Transformer(nn.Module):
  """Pre-norm transformer; returns the final (normed) tokens and every block's output."""
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = []
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_ratio, self.dropout, name=f'block{i}')(x, train)
      hidden.append(x)
    return nn.LayerNorm(name='norm')(x), hidden


class PatchStem(nn.Module):
  """Plain ViT patchify: one strided convolution."""
  width: int
  patch: int

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding='VALID')(images)
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

  @nn.compact
  def __call__(self, images):
    if self.patch % self.stride:
      raise ValueError(f'patch={self.patch} must be divisible by stem stride={self.stride}')
    x = einops.rearrange(images, 'b (h p) (w q) c -> b h w (p q c)', p=self.stride, q=self.stride)
    branches = [nn.gelu(nn.Conv(self.channels, (k, k), name=f'branch{k}')(x))
                for k in self.kernels]
    x = jnp.concatenate(branches, axis=-1)
    x = nn.gelu(nn.Conv(2 * self.channels, (1, 1), name='fuse')(x))
    return PatchStem(self.width, self.patch // self.stride, name='patchify')(x)


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

  @property
  def grid(self) -> int:
    return self.image_size // self.patch

  def setup(self):
    if self.image_size % self.patch:
      raise ValueError(f'image_size={self.image_size} is not divisible by patch={self.patch}')
    if self.stem == 'multiscale':
      self.embed = MultiScaleStem(self.width, self.patch, self.stem_channels, self.stem_kernels,
                                  self.stem_stride)
    elif self.stem == 'patch':
      self.embed = PatchStem(self.width, self.patch)
    else:
      raise ValueError(f"model.stem={self.stem!r}: expected 'patch' or 'multiscale'")
    self.pos_embed = sincos_pos_embed(self.grid, self.width)[None]
    self.encoder = Transformer(self.depth, self.num_heads, self.mlp_ratio, self.dropout)
    self.head = heads.BinnedScoreHead(self.num_bins, tuple(self.score_range))
    self.decoder_embed = nn.Dense(self.decoder_width)
    self.mask_token = self.param('mask_token', nn.initializers.normal(0.02), (1, 1, self.decoder_width))
    self.decoder_pos_embed = sincos_pos_embed(self.grid, self.decoder_width)[None]
    self.decoder = Transformer(self.decoder_depth, self.decoder_heads, self.mlp_ratio)
    self.decoder_pred = nn.Dense(self.patch * self.patch * 3)

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
