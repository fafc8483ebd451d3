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

  ``grad_accum_steps=k`` (static; the loop passes ``config.train.grad_accum_steps``)
  splits the batch into k micro-batches, sums their gradients in a ``lax.scan``
  and takes one optimizer step: for a loss that is a plain mean over examples
  the result is the big batch's, with 1/k of its activation memory. Micro-batch
  i draws its randomness from ``fold_in(rng, i)``.

  ``skip_nonfinite=True`` (static; ``config.train.on_nonfinite='skip'``): a step
  whose loss, gradients or new parameters are not all finite changes nothing
  but the step count, and its metrics say ``skipped=1``.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(state, batch, rng, *consts, grad_accum_steps: int = 1,
             skip_nonfinite: bool = False):
    new_state = {}
    if 'model_state' in state:
      if grad_accum_steps > 1:
        raise ValueError(
            f'grad_accum_steps={grad_accum_steps}: this model has BatchNorm statistics, which '
            'would be computed per micro-batch and differ from the big batch\'s; use '
            'grad_accum_steps=1 (or more devices) for it')
      (loss, (metrics, new_state['model_state'])), grads = grad_fn(
          state['params'], batch, rng, *consts, model_state=state['model_state'])
    elif grad_accum_steps > 1:
      loss, metrics, grads = _accumulate(grad_fn, state['params'], batch, rng, consts,
                                         grad_accum_steps)
    else:
      (loss, metrics), grads = grad_fn(state['params'], batch, rng, *consts)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **metrics}
    new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1,
                 **new_state}
    if skip_nonfinite:
      return _skip_if_nonfinite(state, new_state, loss, grads, metrics)
    return new_state, metrics
  return update


def all_finite(tree) -> jax.Array:
  """True when every float leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _skip_if_nonfinite(state, new_state, loss, grads, metrics):
  """``new_state``, or ``state`` with the step advanced when the step is not finite.

  Inside the jitted update (a select, no host sync). optax.apply_if_finite does
  not fit: it checks the gradients only, not the loss or BatchNorm statistics,
  and adds its counters to the optimizer state (another checkpoint layout).
  """
  ok = jnp.isfinite(loss) & all_finite(grads) & all_finite(new_state['params'])
  kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                      {k: v for k, v in new_state.items() if k != 'step'},
                      {k: state[k] for k in new_state if k != 'step'})
  return {**kept, 'step': new_state['step']}, {**metrics, 'skipped': 1.0 - ok.astype(jnp.float32)}


def micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B // k, ...]; micro-batch i holds rows i, i + k, i + 2k, ...

  Strided rows: each device's contiguous shard of the batch feeds every
  micro-batch, so the split moves no data between devices.
  """
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into {k} micro-batches')
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _accumulate(grad_fn, params, batch, rng, consts, k: int):
  """Mean loss, metrics and gradients over k micro-batches (a scan: one in memory at a time)."""
  micro = micro_batches(batch, k)

  def body(total, xs):
    i, mb = xs
    (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), *consts)
    return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda mb: grad_fn(params, mb, rng, *consts), first)
  (loss_shape, metrics_shape), grads_shape = shapes
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       (loss_shape, metrics_shape, grads_shape))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
  return jax.tree.map(lambda t: t / k, total)


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
