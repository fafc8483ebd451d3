"""Optimizers: AdamW with warmup + cosine decay and optional layer-wise lr decay."""
from typing import Callable

import jax
import optax
from flax import traverse_util


def schedule(config, num_steps: int) -> optax.Schedule:
  warmup = min(int(config.warmup_steps), max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=config.lr * config.get('end_lr_factor', 0.0))


def _decay_mask(params):
  # No weight decay on biases, norms and embeddings' 1-D parameters.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def adamw(config, num_steps: int, params=None,
          layer_id: Callable[[str], int] | None = None, num_layers: int = 0):
  """AdamW; with ``config.layer_decay < 1`` layer i of L gets lr * decay**(L - i).

  ``layer_id`` maps a '/'-joined parameter path to its layer (0 = embedding,
  num_layers = head); used for fine-tuning pretrained encoders (BEiT/MAE).
  """
  sched = schedule(config, num_steps)
  # Clipping comes first, on the norm of the whole gradient: inside the per-layer groups of
  # multi_transform it would see only its group's part and clip each group on its own.
  clip = optax.clip_by_global_norm(config.get('grad_clip', 1.0))

  def scaled_adamw(scale: float = 1.0):
    return optax.adamw(lambda step: sched(step) * scale, b1=0.9, b2=config.get('b2', 0.999),
                       weight_decay=config.weight_decay, mask=_decay_mask)

  decay = config.get('layer_decay', 1.0)
  if decay >= 1.0 or layer_id is None:
    return optax.chain(clip, scaled_adamw()), sched
  flat = traverse_util.flatten_dict(params, sep='/')
  labels = traverse_util.unflatten_dict(
      {k: f'layer{layer_id(k)}' for k in flat}, sep='/')
  used = sorted({int(v[5:]) for v in jax.tree.leaves(labels)})
  transforms = {f'layer{i}': scaled_adamw(decay ** (num_layers - i)) for i in used}
  return optax.chain(clip, optax.multi_transform(transforms, labels)), sched
