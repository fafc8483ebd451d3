"""Prediction heads shared by the model families."""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class BinnedScoreHead(nn.Module):
  """Regresses a bounded score as the expectation over fixed score bins.

  Logits over bins give the score a distribution, so output distillation can
  use a temperature-softened KL (Hinton et al.) instead of a bare MSE.
  """
  num_bins: int = 9
  score_range: Sequence[float] = (1.0, 5.0)

  @property
  def centers(self) -> jax.Array:
    lo, hi = self.score_range
    return jnp.linspace(lo, hi, self.num_bins)

  @nn.compact
  def __call__(self, pooled, train: bool = False):
    if self.num_bins < 2:
      raise ValueError(f'num_bins must be >= 2, got {self.num_bins}')
    x = nn.LayerNorm(name='norm')(pooled)
    logits = nn.Dense(self.num_bins, kernel_init=nn.initializers.zeros, name='dense')(x)
    logits = logits.astype(jnp.float32)
    score = jnp.sum(jax.nn.softmax(logits) * self.centers, axis=-1)
    return logits, score


class ArcFaceHead(nn.Module):
  """Cosine between L2-normalised embeddings and class centres: [B, num_classes], fp32.

  The margin and scale are applied by ``losses.arcface`` on these cosines.
  """
  num_classes: int
  eps: float = 1e-12

  @nn.compact
  def __call__(self, embeddings):
    weight = self.param('weight', nn.initializers.normal(0.01),
                        (embeddings.shape[-1], self.num_classes))
    x = embeddings.astype(jnp.float32)
    # rsqrt of the clamped squared norm: finite gradients even for a zero vector.
    x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), self.eps))
    w = weight * jax.lax.rsqrt(jnp.maximum(jnp.sum(weight * weight, axis=0, keepdims=True),
                                           self.eps))
    return x @ w


class TokenProjector(nn.Module):
  """Maps each of a student's token sets to a teacher's width (feature distillation)."""
  widths: Sequence[int]

  @nn.compact
  def __call__(self, tokens):
    return [nn.Dense(w, name=f'proj{i}')(t) for i, (w, t) in enumerate(zip(self.widths, tokens))]
