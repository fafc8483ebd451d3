"""Plain-dict train states and the generic gradient update (big_vision style)."""
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def init_state(params, tx: optax.GradientTransformation, model_state=None) -> dict:
  """``model_state``: non-trained variables such as BatchNorm statistics."""
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  if model_state is not None:
    state['model_state'] = model_state
  return state


def make_update(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """Turns ``loss_fn(params, batch, rng, *consts) -> (loss, metrics)`` into an update.

  Only ``state['params']`` is differentiated: anything passed in ``consts``
  (frozen teachers) gets no gradient and no optimizer state. A state with a
  ``model_state`` entry (BatchNorm statistics) calls
  ``loss_fn(params, batch, rng, *consts, model_state=...)``, which returns
  ``(loss, (metrics, new_model_state))``.
  """
  def update(state, batch, rng, *consts):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    new_state = {}
    if 'model_state' in state:
      (loss, (metrics, new_state['model_state'])), grads = grad_fn(
          state['params'], batch, rng, *consts, model_state=state['model_state'])
    else:
      (loss, metrics), grads = grad_fn(state['params'], batch, rng, *consts)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **metrics}
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1,
            **new_state}, metrics
  return update


def merge_pretrained(params, pretrained, prefix: str = '') -> tuple[dict, list[str]]:
  """Copies every leaf of ``pretrained`` whose path and shape exist in ``params``.

  Returns the merged params and the paths that were left at their init
  (e.g. a new head), so the caller can log them.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  fresh, leaves = [], []
  for path, value in flat:
    key = jax.tree_util.keystr(path)
    if key in src and src[key].shape == value.shape:
      leaves.append(src[key])
    else:
      leaves.append(value)
      fresh.append(prefix + key)
  return jax.tree.unflatten(jax.tree.structure(params), leaves), fresh
