"""Plain-dict train states and the generic gradient update (big_vision style)."""
import fnmatch
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def init_state(params, tx: optax.GradientTransformation, model_state=None,
               ema: bool = False) -> dict:
  """``model_state``: non-trained variables such as BatchNorm statistics; ``ema``: keep an
  exponential moving average of the parameters (``make_update``'s ``ema_decay``)."""
  state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  if model_state is not None:
    state['model_state'] = model_state
  if ema:
    state['ema_params'] = jax.tree.map(jnp.copy, params)
  return state


def trained_params(state: dict):
  """The parameters a finished stage hands on: the moving average when the state keeps one."""
  return state.get('ema_params', state['params'])


def ema_decay_at(decay: float, step) -> jax.Array:
  """``decay``, lowered early in training ((1 + t) / (10 + t), as timm's ModelEmaV2 warmup) so
  the average is not dominated by the random init in short runs."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


MASKED = '_masked'  # metrics entry of a loss_fn: {group: (part of the loss, mask count)}


def without_masked(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if k != MASKED}


def make_update(loss_fn: Callable, tx: optax.GradientTransformation,
                ema_decay: float = 0.0) -> Callable:
  """Turns ``loss_fn(params, batch, rng, *consts) -> (loss, metrics)`` into an update.

  Only ``state['params']`` is differentiated: anything passed in ``consts``
  (frozen teachers) gets no gradient and no optimizer state. A state with a
  ``model_state`` entry (BatchNorm statistics) calls
  ``loss_fn(params, batch, rng, *consts, model_state=...)``, which returns
  ``(loss, (metrics, new_model_state))``.

  ``grad_accum_steps=k`` (static; the loop passes ``config.train.grad_accum_steps``)
  splits the batch into k micro-batches, sums their gradients in a ``lax.scan``
  and takes one optimizer step with 1/k of the activation memory. Micro-batch i
  draws its randomness from ``fold_in(rng, i)``. The step is the big batch's for a
  loss that is a mean over examples, and also for parts of it that are means over a
  mask whose count differs between micro-batches (labeled rows, component tokens):
  ``loss_fn`` reports each such part in ``metrics[MASKED]`` = {group: (part, count)}
  and micro-batch i's part is weighted by count_i / total count instead of 1/k.

  ``skip_nonfinite=True`` (static; ``config.train.on_nonfinite='skip'``): a step
  whose loss, gradients or new parameters are not all finite changes nothing
  but the step count, and its metrics say ``skipped=1``.

  ``ema_decay > 0`` (a state made with ``init_state(..., ema=True)``): after each step
  ``ema_params = d * ema_params + (1 - d) * params``, d = ``ema_decay_at(ema_decay, step)``.
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
      loss, metrics, grads = _accumulate(loss_fn, state['params'], batch, rng, consts,
                                         grad_accum_steps)
    else:
      (loss, metrics), grads = grad_fn(state['params'], batch, rng, *consts)
    metrics = without_masked(metrics)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **metrics}
    new_state = {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1,
                 **new_state}
    if ema_decay:
      d = ema_decay_at(ema_decay, state['step'])
      new_state['ema_params'] = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p,
                                             state['ema_params'], params)
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


def _accumulate(loss_fn, params, batch, rng, consts, k: int):
  """Loss, metrics (their mean) and gradients of the big batch from k micro-batches (a scan:
  one in memory at a time); ``MASKED`` parts weighted by their share of the mask count."""
  micro = micro_batches(batch, k)
  steps = jnp.arange(k)
  first = jax.tree.map(lambda x: x[0], micro)
  loss_shape, metrics_shape = jax.eval_shape(lambda mb: loss_fn(params, mb, rng, *consts), first)

  def counts(i, mb):  # under jit only the masks are computed: the model is dead code here
    _, metrics = loss_fn(params, mb, jax.random.fold_in(rng, i), *consts)
    return {g: c for g, (_, c) in metrics.get(MASKED, {}).items()}

  shares = {}
  if MASKED in metrics_shape:
    per_micro = jax.lax.map(lambda xs: counts(*xs), (steps, micro))  # {group: [k]}
    shares = {g: c / jnp.maximum(c.sum(), 1.0) for g, c in per_micro.items()}

  def objective(p, mb, r, share):
    loss, metrics = loss_fn(p, mb, r, *consts)
    out = loss / k + sum(part * (share[g] - 1.0 / k)
                         for g, (part, _) in metrics.get(MASKED, {}).items())
    return out, without_masked(metrics)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def body(total, xs):
    i, mb, share = xs
    (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), share)
    metrics = jax.tree.map(lambda m: m / k, metrics)
    return jax.tree.map(jnp.add, total, (loss, metrics, grads)), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       (loss_shape, without_masked(metrics_shape), params))
  total, _ = jax.lax.scan(body, zeros, (steps, micro, shares))
  return total


class PretrainedMismatch(ValueError):
  """Pretrained weights that do not fit the model they are loaded into."""


def _patterns(reinit) -> list[str]:
  if isinstance(reinit, str):
    reinit = reinit.split(',')
  return [p.strip() for p in reinit if p.strip()]


def load_pretrained(params, pretrained, reinit=(), where: str = 'pretrained') -> tuple[dict, dict]:
  """``params`` with every leaf taken from ``pretrained`` (same '/'-joined path and shape).

  Strict: a leaf the checkpoint lacks or holds in another shape is an error listing every
  such path with both shapes, unless it matches one of the ``reinit`` patterns (fnmatch,
  e.g. 'head/*'; a list or a comma-separated string), which keep their initial values. A
  pattern that matches no parameter is an error too (a typo would silently load nothing
  less). Checkpoint leaves the model has no use for (an MAE decoder) are counted, not
  loaded. Works on arrays and on shapes (``jax.eval_shape``). Returns (params, facts).
  """
  patterns = _patterns(reinit)
  flat = traverse_util.flatten_dict(params, sep='/')
  src = traverse_util.flatten_dict(pretrained, sep='/')
  merged, kept, bad = {}, [], []
  for path, value in flat.items():
    have = src.get(path)
    if have is not None and have.shape == value.shape:
      merged[path] = have
      continue
    merged[path] = value
    if any(fnmatch.fnmatchcase(path, p) for p in patterns):
      kept.append(path)
    else:
      bad.append(f'{path}: model {tuple(value.shape)}, pretrained '
                 f'{"missing" if have is None else tuple(have.shape)}')
  unused = [p for p in patterns if not any(fnmatch.fnmatchcase(k, p) for k in flat)]
  if bad or unused:
    raise PretrainedMismatch(
        f'{where} does not fit the model ({len(bad)} parameter(s)): ' + '; '.join(bad)
        + (f'; reinit pattern(s) {unused} match no parameter' if unused else '')
        + '. List what may keep its initial values in the reinit key.')
  facts = {'from': where, 'loaded': len(flat) - len(kept), 'kept_init': kept,
           'not_used': len(set(src) - set(flat))}
  return traverse_util.unflatten_dict(merged, sep='/'), facts
