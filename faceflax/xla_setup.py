"""XLA flags and memory settings for the CPU backend, set once, before JAX starts a backend.

XLA:CPU's own kernels for matmuls and reductions are slower than the YNNPACK ones it can
hand them to (an experimental XLA option, off by default in jax 0.10; this XLA has no
YNNPACK convolution fusion, so convolutions keep XLA's kernels): measured on the real train
steps by ``bench/bench_xla_flags.py`` (README "Benchmarks"). The flags name the CPU backend
only; accelerator programs are unchanged.

A flag already in the environment's XLA_FLAGS wins over ours; FACEFLAX_XLA_CPU_FLAGS=off
sets none (XLA's defaults), FACEFLAX_XLA_CPU_FLAGS='--xla_...' sets those instead.

XLA:CPU allocates a step's temporaries as one block (521 MiB for the LQFR teacher's step)
and frees it after the step; glibc serves a block that large with a fresh mmap each time,
so every step faults all its pages in again (0.25 s of kernel time per LQFR teacher step,
measured with getrusage). Where JAX computes on the CPU, ``configure`` therefore has glibc
keep freed memory for reuse (no mmap for large blocks, no trimming: the process keeps its
peak heap) and runs each step on the thread that calls it (``jax_cpu_enable_async_dispatch``
off): that thread's arena is glibc's main one, whereas a worker thread's arena would still
mmap the block. One malloc arena for every thread would also do it, but slowed a real run,
whose input pipeline allocates from many threads, by a quarter. Not applied where an
accelerator plugin is installed (unless JAX_PLATFORMS=cpu); FACEFLAX_MALLOC=default leaves
both as they are.
"""
import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

CPU_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=dot,reduce'


def flags_to_add(current: str, ours: str) -> str:
  """``ours``, less the flags that ``current`` already sets (by name)."""
  named = {f.split('=', 1)[0] for f in current.split()}
  return ' '.join(f for f in ours.split() if f.split('=', 1)[0] not in named)


# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS says so, or no accelerator plugin
  (a PJRT plugin or libtpu) is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not (importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('libtpu'))


def reuse_step_memory() -> bool:
  """Freed memory kept for reuse and steps run on the calling thread (module docstring);
  False where not applied (FACEFLAX_MALLOC=default, an accelerator, not Linux / glibc)."""
  if os.environ.get('FACEFLAX_MALLOC', '').strip().lower() == 'default':
    return False
  if not sys.platform.startswith('linux') or not computes_on_cpu():
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  if not all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True


def configure() -> None:
  """Adds the CPU flags to XLA_FLAGS and keeps step memory for reuse; call before the first
  JAX computation."""
  reuse_step_memory()
  ours = os.environ.get('FACEFLAX_XLA_CPU_FLAGS', CPU_FLAGS)
  if ours.strip().lower() == 'off':
    return
  current = os.environ.get('XLA_FLAGS', '')
  extra = flags_to_add(current, ours)
  if extra:
    os.environ['XLA_FLAGS'] = f'{current} {extra}'.strip()
