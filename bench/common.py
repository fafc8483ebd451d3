"""Shared benchmark helpers: the machine's matmul peak and a train stage's throughput."""
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from faceflax.train import loop, mesh as mesh_lib


def matmul_peak_gflops(n: int = 2048, reps: int = 10, dtype=jnp.float32) -> float:
  """Matmul throughput of this machine in ``dtype`` (a step's compute dtype), the yardstick
  for the steps."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  peak = 2 * n ** 3 / np.median(times) / 1e9
  name = {'float32': 'fp32', 'bfloat16': 'bf16'}.get(jnp.dtype(dtype).name, jnp.dtype(dtype).name)
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; '
        f'{name} matmul peak ({n}^3, median of {reps}): {peak:.1f} GFLOP/s')
  return peak


def step_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def bench_stage(stage: loop.Stage, mesh, steps: int, pipeline_batches: int) -> dict:
  batches = stage.batches(start_step=0)
  host = next(batches)
  batch = mesh_lib.put_batch(host, mesh)
  state = jax.jit(stage.init_fn, out_shardings=mesh_lib.replicated(mesh))(jax.random.key(0))
  update, compile_s = loop.compile_update(stage, mesh, batch, jax.eval_shape(lambda s: s, state))
  flops = step_flops(update)
  state, m = update(state, batch, jax.random.key(0), *stage.consts)  # warm-up
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = update(state, batch, jax.random.key(i), *stage.consts)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  t = time.perf_counter()
  for _ in range(pipeline_batches):
    next(batches)
  pipe_img_s = pipeline_batches * stage.batch_size / (time.perf_counter() - t)
  return {'img_s': stage.batch_size / step_s, 'compile_s': compile_s,
          'gflops_s': flops / step_s / 1e9, 'pipeline_img_s': pipe_img_s}




def print_header():
  print(f'{"stage":18s} {"batch":>5s} {"img/s":>8s} {"compile s":>9s} {"GFLOP/s":>8s} '
        f'{"% peak":>7s} {"pipeline img/s":>14s} {"pipe/step":>9s}')


def print_row(name: str, stage: loop.Stage, r: dict, peak: float):
  print(f'{name:18s} {stage.batch_size:5d} {r["img_s"]:8.1f} {r["compile_s"]:9.1f} '
        f'{r["gflops_s"]:8.1f} {100 * r["gflops_s"] / peak:6.1f}% {r["pipeline_img_s"]:14.1f} '
        f'{r["pipeline_img_s"] / r["img_s"]:8.1f}x')


def run_fresh(args: list, env: dict, what: str) -> dict:
  """Runs ``python args --json=FILE`` in a fresh process (XLA reads its flags and JAX fills
  its caches once per process) with ``env`` added to the environment; returns the JSON the
  process wrote. ``what``: the run, named in the error if it fails."""
  with tempfile.NamedTemporaryFile(suffix='.json') as out:
    proc = subprocess.run([sys.executable, *args, f'--json={out.name}'],
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          check=False)
    if proc.returncode:
      raise RuntimeError(f'{what} failed:\n{proc.stderr[-3000:]}')
    with open(out.name) as f:
      return json.load(f)
