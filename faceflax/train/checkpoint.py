"""Orbax checkpoints of plain-dict train states, one manager per stage."""
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  pass


def manager(directory: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(int(save_every), 1), max_to_keep=max(int(keep), 1),
      create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """Restores the newest readable checkpoint; a broken one is reported and skipped.

  Returns (step, state) or (None, None) when there is no checkpoint.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
      return step, state
    except Exception as e:  # pylint: disable=broad-except
      logging.error('checkpoint %s/%d is unreadable (%s: %s); trying an older one',
                    mngr.directory, step, type(e).__name__, str(e)[:300])
  return None, None


def load_params(directory: str, abstract_state, what: str):
  """Loads the final params of a finished stage (e.g. the teacher for KD)."""
  if not os.path.isdir(directory):
    raise CheckpointError(f'{what}: no checkpoint directory {directory}; run that stage first')
  mngr = ocp.CheckpointManager(os.path.abspath(directory))
  step, state = restore_latest(mngr, abstract_state)
  mngr.close()
  if state is None:
    raise CheckpointError(f'{what}: no readable checkpoint in {directory}')
  return step, state


def load_raw(directory: str, sharding, what: str) -> tuple[int, dict]:
  """The newest readable checkpoint as saved, with ``sharding``, whatever its tree.

  The tree comes from the checkpoint's own metadata, so any stage's state loads
  without knowing its model or optimizer (e.g. a backbone for transfer).
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f'{what}: no checkpoint directory {directory}')
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               item_handlers=ocp.StandardCheckpointHandler())
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        meta = mngr.item_metadata(step)
        tree = abstract(getattr(meta, 'tree', meta), sharding)
        return step, mngr.restore(step, args=ocp.args.StandardRestore(tree))
      except Exception as e:  # pylint: disable=broad-except
        logging.error('checkpoint %s/%d is unreadable (%s: %s); trying an older one',
                      directory, step, type(e).__name__, str(e)[:300])
  finally:
    mngr.close()
  raise CheckpointError(f'{what}: no readable checkpoint in {directory}')


def abstract(tree, sharding):
  """ShapeDtypeStructs with the target sharding (one, or a tree of them) for StandardRestore.

  Orbax reshards on restore: a checkpoint saved by N processes, or with
  parameters split over a 'model' axis, loads into any other mesh.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      sharding)
