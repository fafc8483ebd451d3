"""Runs a few update steps of one FBP stage in a fresh process and saves the results.

Used by test_train.py to compare 1 device with 8 simulated devices: the device
count must be fixed (XLA_FLAGS) before JAX is imported, hence a subprocess.
  python tests/run_stage_worker.py WORKDIR OUT.npz
"""
import sys

import jax
import numpy as np

from faceflax.tasks import fbp_kd
from faceflax.train import loop, mesh as mesh_lib
from tests import configs_for_tests

STEPS = 4


def main(workdir, out):
  config = configs_for_tests.fbp('test')
  job = fbp_kd.Job(config, workdir)
  stage = job.stage('teacher_finetune')
  mesh = mesh_lib.make_mesh()
  state = jax.jit(stage.init_fn, out_shardings=mesh_lib.replicated(mesh))(jax.random.key(0))
  batches = stage.batches(start_step=0)
  batch = mesh_lib.put_batch(next(batches), mesh)
  update, _ = loop.compile_update(stage, mesh, batch, jax.eval_shape(lambda s: s, state))
  losses, grad_norms = [], []
  for step in range(STEPS):
    state, metrics = update(state, batch, jax.random.key(step))
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
    batch = mesh_lib.put_batch(next(batches), mesh)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(state['params'])[0]}
  np.savez(out, devices=jax.device_count(), losses=losses, grad_norms=grad_norms, **flat)


if __name__ == '__main__':
  main(*sys.argv[1:])
