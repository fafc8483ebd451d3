"""Multi-host start-up: ``jax.distributed.initialize`` from flags, env or the cluster.

JAX's multi-process runtime is the engine: after ``initialize``, every process
sees all devices of the job (``jax.devices()``), runs the same program on its
own shard of each batch (the pipelines split by ``jax.process_index()``) and
XLA's collectives (gloo on CPU, NCCL / ICI on accelerators) do the rest.

When to initialise (``--distributed``):
  auto  when a coordinator address is given (flag or JAX_COORDINATOR_ADDRESS),
        or under a multi-task SLURM step / Open MPI job / multi-host GKE TPU
        slice, where JAX reads everything from the environment;
  on    always: ``jax.distributed.initialize()`` auto-detects the rest
        (Cloud TPU VMs, Kubernetes, mpi4py);
  off   never (one process).
"""
import os

import jax
from absl import logging

ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
       'process_id': 'JAX_PROCESS_ID'}


def cluster_detected() -> bool:
  """A launcher that starts one process per host/task (and sets their ids) is present."""
  env = os.environ
  # srun sets the step's task count; a batch script alone (one process) does not.
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_STEP_NUM_TASKS', 1)) > 1:
    return True
  if int(env.get('OMPI_COMM_WORLD_SIZE', 1)) > 1:
    return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts the multi-process runtime if asked or detected; returns whether it did.

  Must run before anything touches a JAX backend. Flags win over the env
  variables in ``ENV``; unset values are left to JAX's cluster auto-detection.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f'--distributed={mode!r}: expected auto, on or off')
  args = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
          'process_id': process_id}
  for key, var in ENV.items():
    if args[key] is None and os.environ.get(var):
      value = os.environ[var]
      args[key] = value if key == 'coordinator_address' else int(value)
  asked = args['coordinator_address'] is not None or cluster_detected()
  if mode == 'off' or (mode == 'auto' and not asked):
    return False
  # Cross-process collectives on CPU (JAX's default today; explicit for older defaults).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**{k: v for k, v in args.items() if v is not None})
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def process_zero_first(fn, name: str):
  """``fn()`` on process 0, then on the others: files written to a shared workdir once.

  E.g. the built-in synthetic datasets: their writers skip an existing
  dataset, so the other processes find process 0's and only read it.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return out if jax.process_index() == 0 else fn()
