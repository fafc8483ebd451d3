"""Times each task's real train step on random batches: no data, no TensorFlow.

For each stage of the task (those its config trains, or --stages), built as training
builds it but without reading data (``Stage.batch_spec`` gives the batch's shapes; a KD
stage's frozen teacher is a random init of its teacher stage, pretrained weights are not
loaded: the shapes and the step are the same), on random batches made on the devices
(floats uniform in [-1, 1], integers zero: the step's time does not depend on the values),
it prints one row:

  batch      global batch of the step
  img/s      batch / median step time (after one warm-up step)
  init s     jit and run of the state's init (``loop.jit_init``, as a run starts)
  compile s  tracing + XLA compilation of the update (``loop.compile_update``); with
             JAX_COMPILATION_CACHE_DIR set, a program compiled before is loaded from there
  GFLOPs     per step, XLA's cost analysis of the compiled step over all devices; marked *
             where that count is missing or smaller than the unoptimised HLO's (library
             calls such as cuBLAS / cuDNN convolutions are left out of it on GPU)
  % peak     achieved FLOP/s against a matmul measured at the start of the same run, in
             the step's compute dtype (``train.precision``; 'auto': bf16 on accelerators)
  XLA GiB    XLA's memory analysis of the compiled step, per device: arguments + outputs
             + temporaries - aliased (the donated state)
  peak GiB   the device's peak bytes in use so far (not per stage: the largest of this
             and the earlier stages), where the backend reports it (GPU, TPU; not CPU)

--aot_only allocates nothing: the step is lowered and compiled from the shapes of the
state (``jax.eval_shape`` of init) and of ``batch_spec``, and the FLOPs and the memory
analysis are printed (the ``paper`` presets, on a CPU machine).

  python bench/bench_steps.py --config=configs/fbp_kd.py --steps=10
  python bench/bench_steps.py --config=configs/lqfr_kd.py --stages=student_both
  python bench/bench_steps.py --config=configs/fbp_kd.py:paper --aot_only
  python bench/bench_steps.py --config=configs/lqfr_kd.py:paper --aot_only --num_classes=10575

It imports no TensorFlow (an accelerator machine may have only jax, flax, optax and
ml_collections), and checks so at the end.
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench.common import matmul_peak_gflops
from faceflax import tasks, xla_setup
from faceflax.tasks import age_mtmsa, face_prior, fbp_kd, lqfr_kd, transfer
from faceflax.train import loop, mesh as mesh_lib, precision, stages as stages_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/fbp_kd.py', 'Config of the task to time.')
flags.DEFINE_string('stages', '', 'Comma-separated stages (default: those the config trains).')
flags.DEFINE_integer('steps', 10, 'Timed steps per stage (after one warm-up step).')
flags.DEFINE_bool('aot_only', False, 'Compile from shapes only: FLOPs and memory analysis.')
flags.DEFINE_integer('peak_size', 0, 'Side of the matmul that measures the peak (0: 2048 on '
                     'CPU, 8192 on accelerators).')
flags.DEFINE_string('json', '', 'Also write the rows to this JSON file (stage -> row).')
flags.DEFINE_string('profile', '', 'Also trace the timed steps with jax.profiler into '
                    "PROFILE/<stage> (TensorBoard / Perfetto; the step's HLO beside it) and "
                    'print the ops that take the most time, summed per kind.')
flags.DEFINE_integer('num_classes', 0, 'lqfr_kd: ArcFace identities, which a run takes from '
                     'its data (0: data.synthetic.num_train_ids when data.dir is empty).')
flags.DEFINE_integer('external_dim', 128, "lqfr_kd student_external: the external teacher's "
                     'embedding width (a run takes it from data.external_teacher).')
# transfer's attribute head is as wide as the dataset's +1/-1 columns: CelebA's 40.
ATTRIBUTES = 40
GIB = 2 ** 30


# ----------------------------------------------------------------------------- stages

def fbp_kd_stages(config, workdir, names, make_state):
  """``make_state(stage)``: a state of the stage (random init, or its shapes)."""
  config = config.copy_and_resolve_references()
  config.teacher.finetune.from_pretrained = config.student.kd.from_pretrained = False
  job = fbp_kd.Job(config, workdir)
  if 'student_kd' in names:
    job.provide('teacher_finetune', make_state(job.stage('teacher_finetune', data=False)))
  return {n: job.stage(n, data=False) for n in names}


def lqfr_kd_stages(config, workdir, names, make_state):
  classes = FLAGS.num_classes
  if not classes and config.data.dir:
    raise app.UsageError('lqfr_kd takes its ArcFace classes from data.dir, which this script '
                         'does not read: pass --num_classes (CASIA-WebFace: 10575)')
  job = lqfr_kd.Job(config, workdir)
  job.facts = {'num_classes': classes or config.data.synthetic.num_train_ids,
               'external_dim': FLAGS.external_dim}
  if any(n != 'teacher' for n in names):
    job.provide('teacher', make_state(job.stage('teacher', data=False)))
  return {n: job.stage(n, data=False) for n in names}


def restored_stages(task):
  """Stages of a task without upstream inputs: its restore-only builds read no data."""
  def build(config, workdir, names, make_state):
    del make_state
    job = task.Job(config, workdir)
    return {n: job.stage(n, restore_only=True) for n in names}
  return build


def transfer_stages(config, workdir, names, make_state):
  """The fine-tuning stages on a random backbone (its head's width as the data would give)."""
  del make_state
  job = transfer.Job(config, workdir, backbone=False)
  out = {}
  for name in names:
    spec = transfer.TASKS[name[len('finetune_'):]]
    width = {'classification': spec.num_classes, 'multilabel': ATTRIBUTES}.get(spec.kind, 1)
    out[name] = transfer.finetune_stage(name, job.model, spec, width, None, job.config)
  return out


BUILDERS = {'fbp_kd': fbp_kd_stages, 'lqfr_kd': lqfr_kd_stages,
            'age_mtmsa': restored_stages(age_mtmsa), 'face_prior': restored_stages(face_prior),
            'transfer': transfer_stages}


def trained_stages(config) -> tuple[list[str], list[str]]:
  """(the stages the config trains, every stage of its task)."""
  task = tasks.get(config.task)
  if task is transfer:
    known = [task.stage_name(t) for t in task.TASKS]
    listed = stages_lib.parse(config.tasks, list(task.TASKS), 'tasks', required=True)
    protocols = stages_lib.parse(config.protocols, task.PROTOCOLS, 'protocols', required=True)
    return [task.stage_name(t) for t in listed] if 'finetune' in protocols else [], known
  known = list(task.Job.STAGES)
  return [s for s in stages_lib.parse(config.stages, task.Job.known_stages()) if s in known], known


def stage_names(config) -> list[str]:
  names, known = trained_stages(config)
  if FLAGS.stages:
    names = [s.strip() for s in FLAGS.stages.split(',') if s.strip()]
  unknown = [s for s in names if s not in known]
  if unknown or not names:
    raise app.UsageError(f'--stages={FLAGS.stages!r}: unknown or no stages {unknown}; '
                         f'{config.task} has {", ".join(known)}')
  return names


# ----------------------------------------------------------------------------- one step

def random_batch(spec: dict, mesh, rng) -> dict:
  """A batch of ``spec``'s shapes made on the devices, sharded as a run's batches are."""
  def make(rng):
    return {k: (jax.random.uniform(jax.random.fold_in(rng, i), s.shape, s.dtype, -1, 1)
                if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype))
            for i, (k, s) in enumerate(sorted(spec.items()))}
  return jax.jit(make, out_shardings=mesh_lib.data_sharded(mesh))(rng)


def step_flops(compiled, stage, mesh, batch, abstract_state) -> tuple[float, bool]:
  """(FLOPs of one step over all devices, whether they are the unoptimised HLO's count).

  The compiled count is per device (the partitioned program), the lowered one global;
  on GPU the compiled count leaves out library calls (cuBLAS GEMMs, cuDNN convolutions).
  """
  def flops(analysis):
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float((analysis or {}).get('flops', 0.0))
  n = jax.device_count()
  unoptimised = flops(loop.lower_update(stage, mesh, batch, abstract_state).cost_analysis())
  optimised = flops(compiled.cost_analysis()) * n
  return (unoptimised, True) if optimised < unoptimised else (optimised, False)


def memory(compiled) -> dict:
  """XLA's memory analysis of a compiled step, per device, in GiB."""
  m = compiled.memory_analysis()
  out = {'args': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
         'temps': m.temp_size_in_bytes, 'aliased': m.alias_size_in_bytes}
  out['total'] = out['args'] + out['outputs'] + out['temps'] - out['aliased']
  return {k: v / GIB for k, v in out.items()}


def device_peak_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats['peak_bytes_in_use'] / GIB if 'peak_bytes_in_use' in stats else None


# XLA:CPU's default scheduler ignores memory (remat then saves nothing); its memory-optimised
# one orders the step as the accelerators' schedulers do, so --aot_only on CPU estimates
# what the step needs on an accelerator.
CPU_MEMORY_FIRST = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def analyse(stage, mesh) -> dict:
  """--aot_only: the step compiled from shapes alone (nothing allocated)."""
  _, abstract_state = loop.jit_init(stage, mesh, jax.random.key(0))
  options = CPU_MEMORY_FIRST if jax.default_backend() == 'cpu' else None
  t0 = time.perf_counter()
  compiled = loop.lower_update(stage, mesh, stage.batch_spec, abstract_state).compile(options)
  compile_s = time.perf_counter() - t0
  flops, unoptimised = step_flops(compiled, stage, mesh, stage.batch_spec, abstract_state)
  return {'compile_s': compile_s, 'flops': flops, 'unoptimised': unoptimised,
          'memory': memory(compiled)}


def time_stage(stage, mesh, steps: int) -> dict:
  rng = jax.random.key(0)
  init, abstract_state = loop.jit_init(stage, mesh, rng)
  t = time.perf_counter()
  state = jax.block_until_ready(init(rng))
  init_s = time.perf_counter() - t
  batch = random_batch(stage.batch_spec, mesh, jax.random.key(1))
  update, compile_s = loop.compile_update(stage, mesh, batch, abstract_state)
  flops, unoptimised = step_flops(update, stage, mesh, batch, abstract_state)
  times = []
  for i in range(steps + 1):  # the first one warms up
    t = time.perf_counter()
    state, metrics = update(state, batch, jax.random.key(i), *stage.consts)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times[1:]))
  if FLAGS.profile:
    profile_steps(update, state, batch, stage, steps, os.path.join(FLAGS.profile, stage.name))
  return {'img_s': stage.batch_size / step_s, 'step_s': step_s, 'init_s': init_s,
          'compile_s': compile_s, 'flops': flops, 'unoptimised': unoptimised,
          'memory': memory(update), 'device_peak': device_peak_gib()}


def profile_steps(update, state, batch, stage, steps: int, trace_dir: str):
  """Traces ``steps`` more steps and prints the op kinds with the most (thread) time; the
  compiled step's HLO (the ops' names) goes beside the trace, as step.hlo.txt."""
  os.makedirs(trace_dir, exist_ok=True)
  with open(os.path.join(trace_dir, 'step.hlo.txt'), 'w') as f:
    f.write(update.as_text())
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(steps):
      state, metrics = update(state, batch, jax.random.key(i), *stage.consts)
      jax.block_until_ready(metrics)
  print_op_kinds(trace_dir, steps)


# Host-side spans of the trace (Python frames, the executor, dispatch), not XLA ops.
NOT_OPS = re.compile(r'^\$|Thunk|Pjit|Execute|PjRt|ThreadPool|Await')


def print_op_kinds(trace_dir: str, steps: int, top: int = 12):
  """Sums the trace's XLA op spans per kind (the op name less its numeric suffix: every
  ``transpose_copy_fusion.N`` is one kind): ms per step, share, ops per step. Spans on
  different threads overlap, so the total is thread time, not wall time."""
  path = sorted(glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  time_us, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not NOT_OPS.search(e['name']):
      kind = re.sub(r'[.\d]+$', '', e['name'])
      time_us[kind] += e.get('dur', 0)
      count[kind] += 1
  total = sum(time_us.values())
  print(f'  ops: {total / 1e3 / steps:.1f} ms of thread time per step ({path})')
  for kind, t in time_us.most_common(top):
    print(f'  {t / 1e3 / steps:9.1f} ms {100 * t / total:5.1f}% {count[kind] // steps:6d}  {kind}')


# ----------------------------------------------------------------------------- report

def num(x: float | None) -> str:
  """3 significant digits below 100 (tiny test models), whole numbers above."""
  return '-' if x is None else f'{x:.3g}' if abs(x) < 100 else f'{x:.0f}'


def gflops_cell(r: dict) -> str:
  return num(r['flops'] / 1e9) + ('*' if r['unoptimised'] else '')


def print_timed(name, stage, r, peak, chips):
  pct = 100 * r['flops'] / r['step_s'] / 1e9 / (peak * chips)
  print(f'{name:20s} {stage.batch_size:6d} {r["img_s"]:9.1f} {r["init_s"]:7.1f} '
        f'{r["compile_s"]:9.1f} {gflops_cell(r):>10s} {pct:6.1f}% {num(r["memory"]["total"]):>8s} '
        f'{num(r["device_peak"]):>8s}', flush=True)


def print_analysed(name, stage, r):
  m = r['memory']
  print(f'{name:20s} {stage.batch_size:6d} {r["compile_s"]:9.1f} {gflops_cell(r):>10s} '
        + ' '.join(f'{num(m[k]):>8s}' for k in ('args', 'outputs', 'temps', 'aliased', 'total')),
        flush=True)


def main(argv):
  del argv
  xla_setup.configure()
  config = FLAGS.config
  names = stage_names(config)
  mesh = mesh_lib.make_mesh(config.get('mesh'))
  platform = jax.devices()[0].platform
  print(f'{config.task}: {jax.device_count()} x {platform}, stages {", ".join(names)}')
  if FLAGS.aot_only:
    make_state = lambda stage: jax.eval_shape(stage.init_fn, jax.random.key(0))
    print(f'{"stage":20s} {"batch":>6s} {"compile s":>9s} {"GFLOPs":>10s} {"args GiB":>8s} '
          f'{"out GiB":>8s} {"temp GiB":>8s} {"alias GiB":>8s} {"XLA GiB":>8s}')
  else:
    dtype = precision.compute_dtype(config.train)
    size = FLAGS.peak_size or (2048 if platform == 'cpu' else 8192)
    peak = matmul_peak_gflops(size, dtype=dtype)
    # Simulated CPU devices share the cores the peak was measured on; accelerators do not.
    chips = 1 if platform == 'cpu' else jax.device_count()
    # sharded as a run's (the teacher of a KD stage is a finished run's state)
    make_state = lambda stage: loop.jit_init(stage, mesh, jax.random.key(0))[0](jax.random.key(0))
    print(f'{"stage":20s} {"batch":>6s} {"img/s":>9s} {"init s":>7s} {"compile s":>9s} '
          f'{"GFLOPs":>10s} {"% peak":>7s} {"XLA GiB":>8s} {"peak GiB":>8s}')
  any_unoptimised, rows = False, {}
  with tempfile.TemporaryDirectory() as workdir:
    for name, stage in BUILDERS[config.task](config, workdir, names, make_state).items():
      if FLAGS.aot_only:
        r = analyse(stage, mesh)
        print_analysed(name, stage, r)
      else:
        r = time_stage(stage, mesh, FLAGS.steps)
        print_timed(name, stage, r, peak, chips)
      any_unoptimised |= r['unoptimised']
      rows[name] = dict(r, batch=stage.batch_size)
  print('GFLOPs: per step, all devices' + (
      "; * the unoptimised HLO's count (the compiled one is missing or smaller)"
      if any_unoptimised else ''))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(rows, f, indent=1)
  assert 'tensorflow' not in sys.modules, 'bench_steps.py must not load TensorFlow'


if __name__ == '__main__':
  app.run(main)
