"""Input at scale: a record store of N drawn faces, read by a real train stage's input path.

  python bench/bench_data.py [--sizes=10000,100000,1000000] [--dir=/tmp/faceflax_bench_data]

For each N, writes an array_record store of N 64 px JPEG faces (timed; the faces
cycle through a pool of ``--pool`` drawn ones, so drawing does not dominate the
write), then measures in a fresh process per case, pinned to ``--cores`` CPU cores:

- time to the first batch (from the process's start: imports, opening the store,
  building the pipeline; in 'cache' mode also decoding the whole split),
- peak RSS (VmHWM) after the timed batches,
- steady images/s (median over windows of batches), and per core,
- and, in this process, the cost of a random record read with the page cache dropped,

for the 'paper' presets' train input: ``fbp_kd`` (224 px, random resized crop + flip
+ value range, as the teacher fine-tuning and KD stages read it) and ``lqfr_kd``
(112 px, the degraded student view + flip). 'stream' is the streaming path; 'cache'
is the in-memory path of before, run where it fits (``--cache_max_gb``). Results go to
``--out`` (JSON) and a table on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import time

START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {'fbp_kd': ('configs/fbp_kd.py', 224), 'lqfr_kd': ('configs/lqfr_kd.py', 112)}


def write_store(root, n, pool):
  """A store of ``n`` 64 px JPEG faces with 'score', 'identity' and 'split' columns."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from faceflax.data import records, synthetic  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  faces, labels = synthetic.make_faces(min(pool, n), size=64, seed=0)
  encoded = []
  for face in faces:
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format='JPEG', quality=90)
    encoded.append(buf.getvalue())
  k = len(encoded)
  columns = {'score': labels['score'][np.arange(n) % k],
             'identity': (np.arange(n) % 10_575).astype(np.float32),
             'split': np.full(n, 'train'), 'filename': [f'face{i:07d}.jpg' for i in range(n)]}
  t = time.perf_counter()
  records.write_store(root, n, lambda i: encoded[i % k], columns,
                      source={'kind': 'bench_data', 'pool': k}, screened={'checked': 'drawn'})
  return time.perf_counter() - t, sum(len(e) for e in encoded) / k


def child(args):
  """One case in this fresh process: first batch, steady rate, peak RSS."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  from faceflax.data import folder, pipeline  # pylint: disable=g-import-not-at-top
  path, size = CASES[args.task]
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('paper')
  config.data.dir, config.data.input = args.store, args.mode
  assert config.data.image_size == size
  examples = folder.read_folder(args.store, 'train', label_columns=('score', 'identity'))
  if args.task == 'fbp_kd':  # the teacher fine-tuning / KD input
    labels, pp = {'score': examples.labels['score']}, config.data.train_pp
  else:  # the degraded student's input (the teacher's is a subset of it)
    labels = {'label': examples.labels['identity']}
    pp = f'{config.data.degrade}|{config.data.train_pp}'
  batches = pipeline.train_batches(config, examples.images, labels, batch_size=args.batch_size,
                                   pp=pp, seed=0)(start_step=0)
  next(batches)
  first = time.perf_counter() - START
  times, t = [], time.perf_counter()
  end = t + args.seconds
  while time.perf_counter() < end or len(times) < 5:
    next(batches)
    now = time.perf_counter()
    times.append(now - t)
    t = now
  rate = args.batch_size / float(np.median(times[1:]))
  # VmHWM: this process's own peak. (ru_maxrss keeps the parent's peak across fork + exec.)
  status = open('/proc/self/status').read()  # pylint: disable=consider-using-with
  rss = int(status.split('VmHWM:')[1].split()[0]) / 2**10
  print(json.dumps({'first_batch_s': first, 'images_per_s': rate,
                    'images_per_s_per_core': rate / args.cores, 'peak_rss_mb': rss,
                    'batches_timed': len(times)}))


def random_reads(store_dir, reads=2000):
  """Microseconds per record read at random positions of the store, its pages dropped from
  the page cache first when this process may (root): what a step's reads cost once the
  data is bigger than the memory that caches it."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from faceflax.data import records  # pylint: disable=g-import-not-at-top
  try:
    with open('/proc/sys/vm/drop_caches', 'w') as f:
      f.write('3\n')
    cold = True
  except OSError:
    cold = False
  store = records.RecordStore(store_dir)
  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for _ in range(reads // 64):
    store.read(rng.integers(0, len(store), 64))
  return {'us_per_read': (time.perf_counter() - t) / (reads // 64 * 64) * 1e6, 'cold': cold}


def run_case(args, store, task, mode):
  cmd = [sys.executable, __file__, '--child', f'--store={store}', f'--task={task}',
         f'--mode={mode}', f'--seconds={args.seconds}', f'--batch_size={args.batch_size}',
         f'--cores={args.cores}']
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu')
  pin = ['taskset', '-c', ','.join(map(str, range(args.cores)))]
  out = subprocess.run(pin + cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    return {'error': out.stderr.strip().splitlines()[-1][:300]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='10000,100000,1000000')
  parser.add_argument('--cache_max_gb', type=float, default=6.0,
                      help="the in-memory 'cache' path is also measured where the decoded "
                           'split is at most this big (it holds two copies while batching)')
  parser.add_argument('--dir', default='/tmp/faceflax_bench_data')
  parser.add_argument('--pool', type=int, default=20_000)
  parser.add_argument('--seconds', type=float, default=20)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--cores', type=int, default=1)
  parser.add_argument('--out', default='')
  parser.add_argument('--child', action='store_true')
  parser.add_argument('--store')
  parser.add_argument('--task', choices=sorted(CASES))
  parser.add_argument('--mode', choices=('stream', 'cache'))
  args = parser.parse_args()
  if args.child:
    return child(args)
  sys.path.insert(0, REPO)
  from faceflax.data import records  # pylint: disable=g-import-not-at-top
  results = {'cores': args.cores, 'batch_size': args.batch_size, 'cases': []}
  for n in (int(n) for n in args.sizes.split(',')):
    store = os.path.join(args.dir, f'faces_{n}')
    if not records.is_store(store):
      write_s, jpeg_bytes = write_store(store, n, args.pool)
      print(f'N={n}: wrote the store in {write_s:.1f} s ({jpeg_bytes:.0f} B per JPEG)',
            flush=True)
      results.setdefault('write_s', {})[n] = write_s
    results.setdefault('random_reads', {})[n] = reads = random_reads(store)
    print(f'N={n}: random record reads {reads}', flush=True)
    for task in CASES:
      fits = n * CASES[task][1] ** 2 * 3 <= args.cache_max_gb * 2**30
      for mode in ('stream', 'cache') if fits else ('stream',):
        row = {'n': n, 'task': task, 'px': CASES[task][1], 'mode': mode,
               **run_case(args, store, task, mode)}
        results['cases'].append(row)
        print(json.dumps(row), flush=True)
  print(f'\n{"N":>8} {"task":8} {"px":>4} {"mode":7} {"first batch s":>13} {"peak RSS MB":>11} '
        f'{"img/s/core":>10}')
  for r in results['cases']:
    if 'error' in r:
      print(f'{r["n"]:>8} {r["task"]:8} {r["px"]:>4} {r["mode"]:7} error: {r["error"]}')
      continue
    print(f'{r["n"]:>8} {r["task"]:8} {r["px"]:>4} {r["mode"]:7} {r["first_batch_s"]:>13.1f} '
          f'{r["peak_rss_mb"]:>11.0f} {r["images_per_s_per_core"]:>10.0f}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
