"""faceflax's XLA:CPU flags (merged under the user's, accepted by this XLA, exact) and its
memory settings (a step's temporaries are reused, not faulted in again every step)."""
import os
import subprocess
import sys

import pytest

from faceflax import xla_setup


def test_user_flags_win_by_name():
  current = '--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot'
  ours = '--xla_cpu_experimental_ynn_fusion_type=dot,reduce --xla_cpu_use_onednn=true'
  assert xla_setup.flags_to_add(current, ours) == '--xla_cpu_use_onednn=true'
  assert xla_setup.flags_to_add('', ours) == ours


def test_configure_appends_and_can_be_switched_off(monkeypatch):
  monkeypatch.setenv('FACEFLAX_MALLOC', 'default')  # this process's malloc stays as it is
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  monkeypatch.delenv('FACEFLAX_XLA_CPU_FLAGS', raising=False)
  xla_setup.configure()
  assert os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 '
                                     + xla_setup.CPU_FLAGS)
  xla_setup.configure()  # idempotent
  assert os.environ['XLA_FLAGS'].count('ynn') == xla_setup.CPU_FLAGS.count('ynn')
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('FACEFLAX_XLA_CPU_FLAGS', 'off')
  xla_setup.configure()
  assert os.environ['XLA_FLAGS'] == ''


# Convolutions (strided and grouped, dilated), a matmul and reductions, with their gradients,
# under the flags against the same program without them (XLA's own kernels).
PROGRAM = r'''
import jax, jax.numpy as jnp, numpy as np
from jax import lax
rng = np.random.default_rng(0)
x = rng.normal(size=(4, 12, 12, 8)).astype(np.float32)
w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
v = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
m = rng.normal(size=(8, 5)).astype(np.float32)

def loss(x, w, v, m):
  y = lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), feature_group_count=2,
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = lax.conv_general_dilated(y, v, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  z = y.mean(axis=(1, 2)) @ m
  return jnp.sum(jnp.tanh(z)) + y.max(axis=(1, 2)).sum()

value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, w, v, m)
np.save(OUT, np.concatenate([np.ravel(value)] + [np.ravel(g) for g in grads]))
'''


def _run(tmp_path, name, xla_flags):
  out = tmp_path / f'{name}.npy'
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', f'OUT = {str(out)!r}\n' + PROGRAM], env=env, check=True)
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.load(out)


def test_cpu_flags_are_accepted_and_change_no_result(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  ours = _run(tmp_path, 'ours', xla_setup.CPU_FLAGS)
  xla = _run(tmp_path, 'xla', '')
  np.testing.assert_allclose(ours, xla, rtol=1e-4, atol=1e-4)


# A step whose temporaries are large blocks (two 64 MiB arrays that an optimisation
# barrier keeps XLA from fusing away), run 8 times: the fewest MiB of page faults of one run
# among the last 5 (the fewest: a block freed just after a run returns can make the next run
# take a second one, once).
REFAULT = r"""
import resource
from faceflax import xla_setup
xla_setup.configure()
import jax, jax.numpy as jnp
from jax import lax
def step(x):
  y, z = lax.optimization_barrier((jnp.sin(x), jnp.cos(x)))
  return (y * z).sum()
step = jax.jit(step)
x = jnp.ones((4096, 4096))
faults = []
for i in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[3:]) * resource.getpagesize() / 2 ** 20)
"""


def _refault_mib(malloc: str) -> float:
  env = dict(os.environ, FACEFLAX_MALLOC=malloc, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', REFAULT], env=env, check=True,
                       capture_output=True, text=True).stdout
  return float(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_step_temporaries_are_reused_not_faulted_in_again():
  # glibc's default mmaps the 128 MiB of temporaries and faults them in at every run
  assert _refault_mib('default') > 100
  assert _refault_mib('') < 16
