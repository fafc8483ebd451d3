"""Mixed precision: the compute dtype of a run (``config.train.precision``).

Models take it as their linen ``dtype``: matmuls and convolutions run in it,
while parameters and optimizer state stay fp32 (linen's ``param_dtype``) and
the numerically sensitive parts stay fp32 whatever it is: LayerNorm and
BatchNorm statistics, attention softmax, the heads' logits and every loss in
``faceflax/losses.py`` (softmax, KL, ArcFace margin).
"""
import jax
import jax.numpy as jnp

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
# 'auto' (the paper presets): bf16 where the devices have bf16 matmul units (GPU, TPU);
# fp32 on CPU, where bf16 is slower (README "Running on a cluster").
PRECISIONS = (*DTYPES, 'auto')


def compute_dtype(train_config):
  name = train_config.get('precision', 'fp32')
  if name not in PRECISIONS:
    raise ValueError(f'config.train.precision={name!r}: expected one of {list(PRECISIONS)}')
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return DTYPES[name]
