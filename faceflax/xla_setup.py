"""XLA flags that faceflax sets for its CPU backend, once, before JAX starts a backend.

XLA:CPU's own kernels for convolutions, matmuls and reductions are slower than the
YNNPACK ones it can hand them to (an experimental XLA option, off by default in jax
0.10): measured on the real train steps by ``bench/bench_xla_flags.py`` (README
"Benchmarks"). The flags name the CPU backend only; accelerator programs are unchanged.

A flag already in the environment's XLA_FLAGS wins over ours; FACEFLAX_XLA_CPU_FLAGS=off
sets none (XLA's defaults), FACEFLAX_XLA_CPU_FLAGS='--xla_...' sets those instead.
"""
import os

CPU_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=dot,reduce'


def flags_to_add(current: str, ours: str) -> str:
  """``ours``, less the flags that ``current`` already sets (by name)."""
  named = {f.split('=', 1)[0] for f in current.split()}
  return ' '.join(f for f in ours.split() if f.split('=', 1)[0] not in named)


def configure() -> None:
  """Adds the CPU flags to XLA_FLAGS; call before the first JAX computation."""
  ours = os.environ.get('FACEFLAX_XLA_CPU_FLAGS', CPU_FLAGS)
  if ours.strip().lower() == 'off':
    return
  current = os.environ.get('XLA_FLAGS', '')
  extra = flags_to_add(current, ours)
  if extra:
    os.environ['XLA_FLAGS'] = f'{current} {extra}'.strip()
