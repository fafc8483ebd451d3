"""Mixup inside the jitted step (on the device, after the host's per-example augmentation)."""
import jax
import jax.numpy as jnp


def mixup(rng: jax.Array, batch: dict, alpha: float, image_key: str = 'image',
          weight_keys: tuple[str, ...] = ()) -> dict:
  """Row i becomes lam_i * row i + (1 - lam_i) * row i-1 (mod B), lam_i ~ Beta(alpha, alpha)
  folded to [0.5, 1] so each mixed view stays mostly its own face.

  Images and float targets are mixed with the same lam; ``weight_keys`` (masks such as
  ``has_label``) are multiplied instead: a mixed row counts only if both of its rows do.
  With a teacher labelling the mixed images this is function matching (Beyer et al., 2022:
  "Knowledge distillation: A good teacher is patient and consistent").
  """
  size = batch[image_key].shape[0]
  lam = jax.random.beta(rng, alpha, alpha, (size,))
  lam = jnp.maximum(lam, 1.0 - lam)
  out = {}
  for key, x in batch.items():
    partner = jnp.roll(x, 1, axis=0)
    if key in weight_keys:
      out[key] = x * partner
    elif jnp.issubdtype(x.dtype, jnp.floating):
      w = lam.reshape((size,) + (1,) * (x.ndim - 1)).astype(x.dtype)
      out[key] = w * x + (1 - w) * partner
    else:
      out[key] = x
  return out
