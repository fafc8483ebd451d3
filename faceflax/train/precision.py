"""Mixed precision: the compute dtype of a run (``config.train.precision``).

Models take it as their linen ``dtype``: matmuls and convolutions run in it,
while parameters and optimizer state stay fp32 (linen's ``param_dtype``) and
the numerically sensitive parts stay fp32 whatever it is: LayerNorm and
BatchNorm statistics, attention softmax, the heads' logits and every loss in
``faceflax/losses.py`` (softmax, KL, ArcFace margin).
"""
import jax.numpy as jnp

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}


def compute_dtype(train_config):
  name = train_config.get('precision', 'fp32')
  if name not in DTYPES:
    raise ValueError(f'config.train.precision={name!r}: expected one of {sorted(DTYPES)}')
  return DTYPES[name]
