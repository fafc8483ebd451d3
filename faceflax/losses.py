"""Losses. Each returns a scalar mean over the (optionally masked) batch, in fp32."""
import jax
import jax.numpy as jnp
import optax


def masked_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def mae_reconstruction(pred, target, mask, norm_pix: bool = True, eps: float = 1e-6):
  """MAE loss: per-patch MSE on masked patches, target normalised per patch.

  pred/target: [B, N, P]; mask: [B, N] with 1 for masked (predicted) patches.
  """
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  if norm_pix:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + eps)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def score_regression(pred, target, weights=None, kind: str = 'mse'):
  """Regression loss on the predicted score ('mse', 'l1' or 'huber')."""
  err = pred.astype(jnp.float32) - target.astype(jnp.float32)
  per_example = {'mse': lambda e: e ** 2,
                 'l1': jnp.abs,
                 'huber': lambda e: optax.huber_loss(e, delta=1.0)}[kind](err)
  return masked_mean(per_example, weights)


def distillation_kl(student_logits, teacher_logits, temperature: float, weights=None):
  """T^2 * KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015), mean over examples."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature ** 2 * masked_mean(kl, weights)


def feature_distillation(student_tokens, teacher_tokens, weights=None, eps: float = 1e-6):
  """MSE between (projected) student tokens and layer-normalised teacher tokens.

  The teacher's tokens are normalised per token so the target scale does not
  depend on the teacher's residual-stream magnitude (as in MaskedKD / FD).
  """
  t = teacher_tokens.astype(jnp.float32)
  t = (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + eps)
  per_example = jnp.mean((student_tokens.astype(jnp.float32) - t) ** 2, axis=(1, 2))
  return masked_mean(per_example, weights)
