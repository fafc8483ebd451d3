"""Orbax checkpoints of plain-dict train states, one manager per stage.

What happens when a checkpoint is not what it should be (README "Failure behaviour"):
- a step being written when the run died is still an Orbax tmp folder
  (``<step>.orbax-checkpoint-tmp-*``, renamed only once complete) and is never listed;
- a step that cannot be read (truncated, corrupted, files missing) is logged by
  name and the previous step is used; a training run moves it aside to
  ``<stage>/ckpt_unreadable/`` so that step can be saved again;
- a checkpoint of another model or config is refused with the differing keys
  (its tree metadata is compared with the expected state before restoring);
- a save that fails raises CheckpointError naming the step: the steps already
  saved stay as they were.
"""
import functools
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

UNREADABLE_DIR = 'ckpt_unreadable'  # beside ckpt/: unreadable steps moved aside by training
_MAX_LISTED = 10

@functools.cache
def _whole_arrays_on_cpu() -> None:
  """On CPU Orbax defaults to replica-parallel saving: every replicated array is cut on
  device into one slice per replica, each cut an eager op compiled for its shape (most of a
  small job's save time on 8 simulated devices); replica 0 writing whole arrays is what a
  data-parallel state needs. Accelerators keep Orbax's default. Called when a checkpoint
  manager opens, not on import."""
  if jax.default_backend() == 'cpu':
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class CheckpointError(RuntimeError):
  pass


def _open(directory: str, options=None) -> ocp.CheckpointManager:
  _whole_arrays_on_cpu()
  # The handler lets item_metadata read a step's tree before restoring it.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def manager(directory: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(save_every), 1), max_to_keep=max(int(keep), 1),
      create=True, enable_async_checkpointing=True)
  return _open(directory, options)


def _key_name(entry) -> str:
  # Metadata trees have dicts where the state has named tuples (optax states).
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaves(tree) -> dict:
  return {'/'.join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _describe(leaf) -> str:
  return f'{tuple(getattr(leaf, "shape", ()))} {getattr(leaf, "dtype", type(leaf).__name__)}'


def mismatches(saved_tree, abstract_state) -> list[str]:
  """Keys that are missing, extra, or of another shape or dtype in a saved tree."""
  have, want = _leaves(saved_tree), _leaves(abstract_state)
  out = [f'{k}: model {_describe(want[k])}, not in the checkpoint' for k in want if k not in have]
  out += [f'{k}: checkpoint {_describe(have[k])}, not in the model' for k in have if k not in want]
  out += [f'{k}: checkpoint {_describe(have[k])}, model {_describe(want[k])}'
          for k in want if k in have and _describe(have[k]) != _describe(want[k])]
  return sorted(out)


def saved_tree(mngr: ocp.CheckpointManager, step: int):
  """The tree metadata (shapes and dtypes) of a saved step."""
  meta = mngr.item_metadata(step)
  tree = getattr(meta, 'tree', meta)
  if tree is None:  # not a refusal (CheckpointError): an unreadable step
    raise FileNotFoundError(f'{step_dir(mngr, step)}: no readable tree metadata')
  return tree


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _newest_readable(mngr, restore, unreadable: list):
  """(step, restore(step)) of the newest step that restores; failed steps go to ``unreadable``.

  A CheckpointError from ``restore`` is a refusal, not damage: it propagates.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, restore(step)
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Damaged files raise many types.
      why = f'{type(e).__name__}: {str(e)[:300]}'
      logging.error('checkpoint %s is unreadable (%s); trying an older one', step_dir(mngr, step),
                    why)
      unreadable.append((step, why))
  return None, None


def _move_aside(mngr, steps) -> None:
  """Moves unreadable steps to ``ckpt_unreadable/`` (kept for inspection), so they can be redone."""
  if not steps:
    return
  if jax.process_index() == 0:
    target = os.path.join(os.path.dirname(str(mngr.directory)), UNREADABLE_DIR)
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dest = os.path.join(target, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
      shutil.move(step_dir(mngr, step), dest)
      logging.error('moved the unreadable checkpoint %s to %s', step_dir(mngr, step), dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('faceflax_unreadable_checkpoints_moved')
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, *, move_unreadable=False):
  """Restores the newest readable checkpoint; an unreadable one is reported and skipped.

  A checkpoint whose keys, shapes or dtypes differ from ``abstract_state`` (another
  model or config) raises CheckpointError listing them. ``move_unreadable``: move
  the skipped steps aside (training, which will save those steps again).
  Returns (step, state) or (None, None) when there is no readable checkpoint.
  """
  def restore(step):
    bad = mismatches(saved_tree(mngr, step), abstract_state)
    if bad:
      raise CheckpointError(
          f'{step_dir(mngr, step)} was saved by a different model or config: {len(bad)} '
          f'key(s) differ: ' + '; '.join(bad[:_MAX_LISTED])
          + ('; ...' if len(bad) > _MAX_LISTED else '')
          + '. Use the config it was trained with, or a new --workdir.')
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

  unreadable = []
  step, state = _newest_readable(mngr, restore, unreadable)
  if move_unreadable:
    _move_aside(mngr, [s for s, _ in unreadable])
  return step, state


def load_params(directory: str, abstract_state, what: str):
  """Loads the final params of a finished stage (e.g. the teacher for KD)."""
  if not os.path.isdir(directory):
    raise CheckpointError(f'{what}: no checkpoint directory {directory}; run that stage first')
  mngr = _open(directory)
  try:
    step, state = restore_latest(mngr, abstract_state)
    newest = mngr.latest_step()
  finally:
    mngr.close()
  if state is None:
    raise CheckpointError(f'{what}: no readable checkpoint in {directory}')
  if step != newest:
    logging.warning('%s: restored step %d of %s, an older one: the newest (step %s) is '
                    'unreadable', what, step, directory, newest)
  return step, state


def load_raw(directory: str, sharding, what: str) -> tuple[int, dict]:
  """The newest readable checkpoint as saved, with ``sharding``, whatever its tree.

  The tree comes from the checkpoint's own metadata, so any stage's state loads
  without knowing its model or optimizer (e.g. a backbone for transfer).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f'{what}: no checkpoint directory {directory}')
  mngr = _open(directory)
  try:
    step, state = _newest_readable(mngr, lambda step: mngr.restore(step, args=ocp.args.StandardRestore(
        abstract(saved_tree(mngr, step), sharding))), [])
  finally:
    mngr.close()
  if state is None:
    raise CheckpointError(f'{what}: no readable checkpoint in {directory}')
  return step, state


def save(mngr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> None:
  """Starts an (async) save of ``state`` at ``step``; a failure raises CheckpointError naming it."""
  previous = mngr.latest_step()
  try:
    mngr.save(step, args=ocp.args.StandardSave(state), force=force)
  except Exception as e:  # pylint: disable=broad-except  # OSError, or an earlier async save's error.
    raise _save_error(mngr, step, previous, e) from e


def finish(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending saves and closes ``mngr``; a failed save raises CheckpointError."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(mngr, None, mngr.latest_step(), e) from e
  finally:
    mngr.close()


def _save_error(mngr, step, previous, error) -> CheckpointError:
  what = f'step {step}' if step is not None else 'the last step'
  kept = f'step {previous}' if previous is not None else 'none yet'
  return CheckpointError(
      f'could not save the checkpoint of {what} in {mngr.directory} '
      f'({type(error).__name__}: {error}); the checkpoints saved before are intact '
      f'(newest: {kept}). Check free space and permissions, then rerun to resume.')


def abstract(tree, sharding):
  """ShapeDtypeStructs with the target sharding (one, or a tree of them) for StandardRestore.

  Orbax reshards on restore: a checkpoint saved by N processes, or with
  parameters split over a 'model' axis, loads into any other mesh.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      sharding)


def state_bytes(abstract_state) -> int:
  """Bytes of one saved copy of a state (an estimate of a checkpoint's size)."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)))
