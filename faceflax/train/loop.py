"""The shared training loop: one stage = init, jit-compiled updates, checkpoints, logs.

Every method describes its stages as ``Stage`` objects; this module runs them
the same way: resume from the stage's latest checkpoint (a finished stage is
not redone), a ``jax.jit`` update with the state donated and batches sharded
along the mesh's data axis, ``rng = fold_in(seed, step)`` so a resumed run
draws the same randomness, periodic log lines (loss, img/s, ETA), TensorBoard
scalars and Orbax checkpoints.
"""
import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from faceflax.train import checkpoint, mesh as mesh_lib

State = dict  # {'params': ..., 'opt_state': ..., 'step': int32 scalar}


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


def done_marker(workdir: str, name: str) -> str:
  return os.path.join(workdir, name, 'done.json')


def is_done(workdir: str, name: str) -> bool:
  return os.path.exists(done_marker(workdir, name))


def compile_update(stage: Stage, mesh, example_batch: dict, abstract_state):
  """jit with explicit shardings; returns (compiled, seconds)."""
  repl, data = mesh_lib.replicated(mesh), mesh_lib.data_sharded(mesh)
  batch_sh = {k: data for k in example_batch}
  jitted = jax.jit(stage.update_fn, donate_argnums=(0,),
                   in_shardings=(repl, batch_sh, repl) + (repl,) * len(stage.consts),
                   out_shardings=(repl, repl))
  t0 = time.perf_counter()
  compiled = jitted.lower(abstract_state, example_batch, jax.random.key(0), *stage.consts).compile()
  return compiled, time.perf_counter() - t0


def _check_finite(metrics: dict, step: int, stage: str):
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise FloatingPointError(
        f'stage {stage}: non-finite {", ".join(bad)} at step {step}; '
        'the last good checkpoint is kept (lower the learning rate or check the data)')


def run(stage: Stage, workdir: str, config, mesh, writer) -> State:
  """Runs (or resumes) one stage and returns its final state."""
  stage_dir = os.path.join(workdir, stage.name)
  mesh_lib.check_batch_size(stage.batch_size, f'{stage.name} batch size')
  repl = mesh_lib.replicated(mesh)
  init = jax.jit(stage.init_fn, out_shardings=repl)
  seed_rng = jax.random.key(config.seed)
  abstract_state = checkpoint.abstract(jax.eval_shape(init, seed_rng), repl)

  mngr = checkpoint.manager(os.path.join(stage_dir, 'ckpt'),
                            save_every=config.checkpoint_every, keep=config.keep_checkpoints)
  step, state = checkpoint.restore_latest(mngr, abstract_state)
  if state is None:
    step, state = 0, init(seed_rng)
  else:
    logging.info('%s: resumed from step %d', stage.name, step)
  if step >= stage.num_steps:
    logging.info('%s: finished earlier (step %d), not redone', stage.name, step)
    mngr.close()
    return state

  batches = stage.batches(start_step=step)
  batch = mesh_lib.put_batch(next(batches), mesh)
  update, compile_s = compile_update(stage, mesh, batch, abstract_state)
  logging.info('%s: compiled the update in %.1fs; training steps %d..%d',
               stage.name, compile_s, step, stage.num_steps)
  stage_rng = jax.random.fold_in(seed_rng, zlib.crc32(stage.name.encode()) % (2 ** 31))

  t_start, t_last, last_step, history = time.perf_counter(), time.perf_counter(), step, []
  while step < stage.num_steps:
    state, metrics = update(state, batch, jax.random.fold_in(stage_rng, step), *stage.consts)
    step += 1
    history.append(metrics)
    if step < stage.num_steps:
      batch = mesh_lib.put_batch(next(batches), mesh)  # overlaps with the async step
    is_log = step % config.log_every == 0 or step == stage.num_steps
    is_save = step % config.checkpoint_every == 0 or step == stage.num_steps
    if is_log or is_save:
      means = {k: float(np.mean([jax.device_get(m[k]) for m in history])) for k in history[0]}
      _check_finite(means, step, stage.name)
      history = []
    if is_log:
      now = time.perf_counter()
      img_s = (step - last_step) * stage.batch_size / max(now - t_last, 1e-9)
      eta = (stage.num_steps - step) * (now - t_last) / max(step - last_step, 1)
      scalars = {f'{stage.name}/{k}': v for k, v in means.items()}
      scalars[f'{stage.name}/img_per_sec'] = img_s
      if stage.schedule is not None:
        scalars[f'{stage.name}/learning_rate'] = float(stage.schedule(step))
      writer.write_scalars(step, scalars)
      logging.info('%s step %d/%d  %s  %.1f img/s  ETA %s', stage.name, step, stage.num_steps,
                   '  '.join(f'{k}={v:.4f}' for k, v in means.items()), img_s, _fmt_time(eta))
      t_last, last_step = now, step
      if stage.on_log is not None:
        stage.on_log(state, step)
    if is_save:
      mngr.save(step, args=checkpoint.ocp.args.StandardSave(state), force=step == stage.num_steps)
  mngr.wait_until_finished()  # Orbax saves are async: finish before declaring the stage done
  mngr.close()
  writer.flush()
  seconds = time.perf_counter() - t_start
  if jax.process_index() == 0:
    with open(done_marker(workdir, stage.name), 'w') as f:
      json.dump({'steps': stage.num_steps, 'seconds': seconds, 'compile_seconds': compile_s}, f)
  logging.info('%s: done in %s', stage.name, _fmt_time(seconds))
  return state


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def count_params(params: Any) -> int:
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))


def flops_per_example(fn: Callable, *args) -> float:
  """XLA's cost-analysis FLOPs of ``fn(*args)`` divided by the batch size of args[-1]."""
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) / jax.tree.leaves(args[-1])[0].shape[0]
