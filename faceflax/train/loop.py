"""The shared training loop: one stage = init, jit-compiled updates, checkpoints, logs.

Every method describes its stages as ``Stage`` objects; this module runs them
the same way: resume from the stage's latest checkpoint (a finished stage is
not redone), a ``jax.jit`` update with the state donated and batches sharded
along the mesh's data axis, ``rng = fold_in(seed, step)`` so a resumed run
draws the same randomness, periodic log lines (loss, img/s, ETA), TensorBoard
scalars, ``<stage>/metrics.jsonl`` and Orbax checkpoints.

Failures (README "Failure behaviour"): the stage folder is checked for writing
and free space before compiling; a step whose loss, gradients or new parameters
are not finite stops the run naming the step and the terms
(``train.on_nonfinite='stop'``, the default) or leaves the state unchanged
(``'skip'``, reported per step); a checkpoint is saved only when the parameters
are finite, and pending saves complete even when the run fails, so the last
good checkpoint is kept.

Scale-out (issue 6): the state is sharded by ``mesh_lib.state_shardings``
(replicated, or parameters split over the mesh's 'model' axis when the stage
gives their logical axes); ``config.grad_accum_steps`` micro-batches make one
step; SIGTERM / SIGINT save the current step and raise ``preemption.Preempted``
(see preemption.py: the step is the whole data and RNG position).
"""
import dataclasses
import functools
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from faceflax import progress
from faceflax.train import checkpoint, files, mesh as mesh_lib, preemption, state as state_lib
from faceflax.train.preemption import Preempted  # pylint: disable=unused-import  # re-exported

State = dict  # {'params': ..., 'opt_state': ..., 'step': int32 scalar}
ON_NONFINITE = ('stop', 'skip')
_params_finite = jax.jit(state_lib.all_finite)


@dataclasses.dataclass
class Stage:
  name: str
  num_steps: int
  batch_size: int
  init_fn: Callable[[jax.Array], State]
  update_fn: Callable[..., tuple[State, dict]]  # (state, batch, rng, *consts) -> (state, metrics)
  batches: Callable[[int], Iterator[dict]]      # start_step -> host batches from that step on
  consts: tuple = ()                            # e.g. frozen teacher params (not donated)
  schedule: Callable[[int], float] | None = None
  on_log: Callable[[State, int], None] | None = None
  loss_fn: Callable[..., Any] | None = None     # the differentiated loss, for tests and analysis
  # Model parallelism: the params' logical axes (nn.get_partition_spec of the
  # boxed params) and the optimizer (to find their moments); None = replicated.
  param_axes: Any = None
  tx: Any = None
  # What init took from elsewhere (``state.load_pretrained``'s facts: from where, how many
  # leaves, which kept their init); recorded in the stage's done marker and results.json.
  loaded: dict = dataclasses.field(default_factory=dict)
  # One global batch as ``batches`` yields it ({name: jax.ShapeDtypeStruct}), known without
  # data: the step compiles from shapes alone (bench/bench_steps.py, ahead-of-time analysis).
  batch_spec: dict | None = None


def batch_spec(batch_size: int, image_size: int, **shapes) -> dict:
  """{'image': [B, S, S, 3], name: [B, *shape] ...}, all float32: the pipeline yields images
  after ``value_range`` and every label as a float32 column (``pipeline._label_columns``)."""
  shapes = {'image': (image_size, image_size, 3), **shapes}
  return {k: jax.ShapeDtypeStruct((batch_size, *v), np.float32) for k, v in shapes.items()}


def train_stage(name: str, cfg, optimizer, init_fn, loss_fn, image_size: int,
                labels: dict | None = None, **fields) -> Stage:
  """A task's stage: ``cfg.steps`` steps of ``cfg.batch_size`` faces (``fields['batch_size']``
  overrides) of ``image_size`` px with ``labels`` ({name: per-example shape}); the update
  differentiates ``loss_fn`` through ``optimizer`` = (tx, schedule) (``optim.adamw``), keeping
  a weight average at ``cfg.ema_decay`` where the config has one. The job attaches the
  batches (``job.Job.stage``); ``fields``: the other ``Stage`` fields (consts, param_axes...)."""
  tx, schedule = optimizer
  batch_size = fields.pop('batch_size', cfg.batch_size)
  return Stage(name=name, num_steps=cfg.steps, batch_size=batch_size, init_fn=init_fn,
               update_fn=state_lib.make_update(loss_fn, tx, cfg.get('ema_decay', 0.0)),
               schedule=schedule, batches=None,
               batch_spec=batch_spec(batch_size, image_size, **(labels or {})), loss_fn=loss_fn,
               tx=tx, **fields)


def done_marker(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, 'done.json')


def is_done(workdir: str, name: str) -> bool:
  return os.path.exists(done_marker(workdir, name))


# Init runs once, and what XLA keeps of it is random-number generation (the forward pass
# feeds no output and is dropped when tracing): one threefry per parameter, on which
# XLA:CPU's full LLVM optimisation spends most of a cold init. Compiled unoptimised, init
# takes 35-60% less time up to ~16M state elements, the generation itself running ~5x
# slower: it breaks even near 250M (README "Benchmarks", start-up). Accelerators keep
# XLA's defaults (unmeasured).
CHEAP_INIT_MAX_ELEMENTS = 100_000_000


def init_compiler_options(shapes, mesh) -> dict:
  """XLA options for compiling the init of a state of these ``shapes`` on ``mesh``."""
  elements = sum(x.size for x in jax.tree.leaves(shapes))
  if mesh.devices.flat[0].platform != 'cpu' or elements > CHEAP_INIT_MAX_ELEMENTS:
    return {}
  return {'xla_backend_optimization_level': 0}


def jit_init(stage: Stage, mesh, rng) -> tuple[Callable, Any]:
  """(init jitted to the state's shardings, the abstract state: shapes and shardings)."""
  shapes = jax.eval_shape(stage.init_fn, rng)
  shardings = mesh_lib.state_shardings(shapes, mesh, stage.param_axes, stage.tx)
  init = jax.jit(stage.init_fn, out_shardings=shardings,
                 compiler_options=init_compiler_options(shapes, mesh))
  return init, checkpoint.abstract(shapes, shardings)


def lower_update(stage: Stage, mesh, example_batch: dict, abstract_state,
                 grad_accum_steps: int = 1, on_nonfinite: str = 'stop'):
  """The update jitted with explicit shardings (state donated), lowered for these shapes.

  ``example_batch`` and ``abstract_state`` may be arrays or ``jax.ShapeDtypeStruct``s.
  """
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
  state_sh = mesh_lib.state_shardings(abstract_state, mesh, stage.param_axes, stage.tx)
  batch_sh = {k: data for k in example_batch}
  update = stage.update_fn
  if grad_accum_steps > 1:
    update = functools.partial(update, grad_accum_steps=grad_accum_steps)
  if on_nonfinite == 'skip':
    update = functools.partial(update, skip_nonfinite=True)
  jitted = jax.jit(update, donate_argnums=(0,),
                   in_shardings=(state_sh, batch_sh, repl) + (repl,) * len(stage.consts),
                   out_shardings=(state_sh, repl))
  return jitted.lower(abstract_state, example_batch, jax.random.key(0), *stage.consts)


def compile_update(stage: Stage, mesh, example_batch: dict, abstract_state,
                   grad_accum_steps: int = 1, on_nonfinite: str = 'stop'):
  """``lower_update(...).compile()``; returns (compiled, seconds: tracing included)."""
  t0 = time.perf_counter()
  compiled = lower_update(stage, mesh, example_batch, abstract_state, grad_accum_steps,
                          on_nonfinite).compile()
  return compiled, time.perf_counter() - t0


def _check_accumulation(stage: Stage, accum: int, mesh) -> None:
  if accum < 1 or stage.batch_size % (accum * mesh_lib.data_size(mesh)):
    raise ValueError(f'{stage.name}: batch size {stage.batch_size} must split into '
                     f'grad_accum_steps={accum} micro-batches of a multiple of the '
                     f'{mesh_lib.data_size(mesh)} data-parallel devices')


def _nonfinite_error(stage: str, step: int, what: str, mngr) -> FloatingPointError:
  kept = mngr.latest_step()
  kept = f'step {kept} in {mngr.directory}' if kept is not None else 'none saved yet'
  return FloatingPointError(
      f'stage {stage}: non-finite {what} at step {step}; stopped, the last good checkpoint '
      f'is kept ({kept}). Lower the learning rate or check the data; '
      "--config.train.on_nonfinite=skip skips such steps instead.")


def _term_order(key: str):
  return key != 'loss', key == 'grad_norm', key  # the loss, its terms, then the gradient


def _check_steps(history, stage: str, on_nonfinite: str, mngr) -> tuple[dict, list[int]]:
  """Means of the metrics of ``history`` ([(step, host metrics)]) and the steps skipped.

  A step with a non-finite metric (the loss, one of its terms, the gradient
  norm) stops the run, unless ``on_nonfinite='skip'`` and the update skipped it.
  """
  skipped, kept = [], []
  for step, metrics in history:
    bad = [f'{k}={float(np.mean(metrics[k]))}' for k in sorted(metrics, key=_term_order)
           if k != 'skipped' and not np.all(np.isfinite(metrics[k]))]
    if on_nonfinite == 'skip' and metrics.get('skipped'):
      logging.warning('%s: step %d skipped (train.on_nonfinite=skip): non-finite loss or '
                      'gradients (%s); parameters unchanged', stage, step,
                      ', '.join(bad) or 'non-finite updated parameters')
      skipped.append(step)
    elif bad:
      raise _nonfinite_error(stage, step, ', '.join(bad), mngr)
    else:
      kept.append(metrics)
  keys = [k for k in history[0][1] if k != 'skipped']
  return {k: float(np.mean([m[k] for m in kept])) for k in keys} if kept else {}, skipped


def run(stage: Stage, workdir: str, config, mesh, writer) -> State:
  """Runs (or resumes) one stage and returns its final state.

  On SIGTERM / SIGINT it saves the current step and raises ``Preempted``.
  """
  stage_dir = os.path.join(workdir, stage.name)
  mesh_lib.check_batch_size(stage.batch_size, f'{stage.name} batch size', mesh)
  accum = int(config.get('grad_accum_steps', 1))
  _check_accumulation(stage, accum, mesh)
  on_nonfinite = config.get('on_nonfinite', 'stop')
  if on_nonfinite not in ON_NONFINITE:
    raise ValueError(f'train.on_nonfinite={on_nonfinite!r}: expected one of {ON_NONFINITE}')
  seed_rng = jax.random.key(config.seed)
  init, abstract_state = jit_init(stage, mesh, seed_rng)

  files.check_writable(stage_dir, need_bytes=checkpoint.state_bytes(abstract_state))
  mngr = checkpoint.manager(os.path.join(stage_dir, 'ckpt'),
                            save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  try:
    step, state = checkpoint.restore_latest(mngr, abstract_state, move_unreadable=True)
  except BaseException:
    mngr.close()
    raise
  if state is None:
    step, state = 0, init(seed_rng)
  else:
    logging.info('%s: resumed from step %d', stage.name, step)
  if step >= stage.num_steps:
    logging.info('%s: finished earlier (step %d), not redone', stage.name, step)
    mngr.close()
    return state

  with preemption.Watcher() as watcher:
    t_start = time.perf_counter()
    try:
      state, step, compile_s, skipped = _train(
          stage, state, step, stage_dir, config, mesh, writer, mngr, watcher, accum,
          abstract_state, seed_rng, on_nonfinite)
    except BaseException:
      _finish_after_error(mngr)
      raise
    checkpoint.finish(mngr)  # Orbax saves are async: finish before declaring anything
    writer.flush()
    if step < stage.num_steps:
      raise Preempted(stage.name, step)
    seconds = time.perf_counter() - t_start
    if jax.process_index() == 0:
      files.write_json(done_marker(workdir, stage.name),
                       {'steps': stage.num_steps, 'seconds': seconds, 'compile_seconds': compile_s,
                        **({'skipped_steps': skipped} if on_nonfinite == 'skip' else {}),
                        **({'loaded': stage.loaded} if stage.loaded else {})})
    logging.info('%s: done in %s', stage.name, progress.duration(seconds))
    if watcher.requested:  # the signal came during the last step: finish, then stop
      raise Preempted(stage.name, step)
  return state


def _finish_after_error(mngr) -> None:
  """Completes the saves already started (the last good checkpoint) while an error propagates."""
  try:
    checkpoint.finish(mngr)
  except checkpoint.CheckpointError as e:
    logging.error('%s', e)


def _train(stage, state, step, stage_dir, config, mesh, writer, mngr, watcher, accum,
           abstract_state, seed_rng, on_nonfinite):
  """The step loop; returns (state, step reached, compile seconds, skipped steps)."""
  batches = stage.batches(start_step=step)
  batch = mesh_lib.put_batch(next(batches), mesh)
  update, compile_s = compile_update(stage, mesh, batch, abstract_state, accum, on_nonfinite)
  logging.info('%s: compiled the update in %.1fs; training steps %d..%d%s',
               stage.name, compile_s, step, stage.num_steps,
               f' ({accum} micro-batches per step)' if accum > 1 else '')
  stage_rng = jax.random.fold_in(seed_rng, zlib.crc32(stage.name.encode()) % (2 ** 31))

  t_last, last_step, history, skipped = time.perf_counter(), step, [], []
  while step < stage.num_steps:
    state, metrics = update(state, batch, jax.random.fold_in(stage_rng, step), *stage.consts)
    step += 1
    history.append((step, metrics))
    stop = watcher.should_stop(step)
    if step < stage.num_steps and not stop:
      batch = mesh_lib.put_batch(next(batches), mesh)  # overlaps with the async step
    is_log = step % config.log_every == 0 or step == stage.num_steps
    is_save = step % config.checkpoint_every == 0 or step == stage.num_steps or stop
    if is_log or is_save:
      means, newly_skipped = _check_steps(jax.device_get(history), stage.name, on_nonfinite, mngr)
      skipped += newly_skipped
      history = []
    if is_log:
      now = time.perf_counter()
      img_s = (step - last_step) * stage.batch_size / max(now - t_last, 1e-9)
      # at the rate since the last line (compilation excluded)
      eta = progress.eta_seconds(step - last_step, stage.num_steps - last_step, now - t_last)
      scalars = {f'{stage.name}/{k}': v for k, v in means.items()}
      scalars[f'{stage.name}/img_per_sec'] = img_s
      if stage.schedule is not None:
        scalars[f'{stage.name}/learning_rate'] = float(stage.schedule(step))
      writer.write_scalars(step, scalars)
      _append_jsonl(os.path.join(stage_dir, 'metrics.jsonl'), {'step': step, **means})
      logging.info('%s step %d/%d  %s  %.1f img/s  ETA %s', stage.name, step, stage.num_steps,
                   '  '.join(f'{k}={v:.4f}' for k, v in means.items()), img_s,
                   progress.duration(eta))
      t_last, last_step = now, step
      if stage.on_log is not None:
        stage.on_log(state, step)
    if is_save:
      if not bool(_params_finite(state['params'])):
        raise _nonfinite_error(stage.name, step, 'parameters (not saved)', mngr)
      checkpoint.save(mngr, step, state, force=step == stage.num_steps or stop)
    if stop and step < stage.num_steps:
      logging.warning('%s: stopping at step %d (signal); saving the checkpoint', stage.name, step)
      break
  return state, step, compile_s, skipped


def _append_jsonl(path: str, row: dict) -> None:
  """Per-step metrics, process 0 only. A run resumed after a crash (not a signal)
  repeats the steps since its last checkpoint: readers keep each step's last row."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def count_params(params: Any) -> int:
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_example(fn: Callable, *args) -> float:
  """XLA's cost-analysis FLOPs of ``fn(*args)`` divided by the batch size of args[-1]."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) / jax.tree.leaves(args[-1])[0].shape[0]


def flops_per_image(fn: Callable, variables, image_size: int) -> float:
  """``flops_per_example`` of ``fn(variables, images)`` on one ``image_size`` px face."""
  return flops_per_example(fn, variables, np.zeros((1, image_size, image_size, 3), np.float32))
