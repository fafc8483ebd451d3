"""SIGTERM mid-epoch: the run saves the current step, exits 75, and resumes step for step.

The run streams its input (``data.input=stream``: each step's images read and decoded
then); the in-memory path gives the same batches from any step
(``test_records.test_streaming_gives_the_cached_batches_and_resumes_exactly``).
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np

from faceflax.train import preemption
from tests.conftest import REPO, xla_flags

STEPS = 40  # 256 faces / batch 8 = 32 steps per epoch: the resumed run crosses an epoch


def _command(workdir):
  return [sys.executable, str(REPO / 'main.py'), f'--config={REPO}/configs/fbp_kd.py:test',
          f'--workdir={workdir}', '--config.stages=teacher_finetune',
          '--config.teacher.finetune.from_pretrained=False',
          f'--config.teacher.finetune.steps={STEPS}', '--config.teacher.finetune.batch_size=8',
          '--config.data.synthetic.num_train=256', '--config.train.log_every=1',
          '--config.data.input=stream',
          '--config.train.checkpoint_every=1000']  # no periodic checkpoint: only the signal's


def _env():
  return dict(os.environ, XLA_FLAGS=xla_flags(2),
              JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / 'teacher_finetune' / 'metrics.jsonl').open()]
  return [r['step'] for r in rows], [r['loss'] for r in rows]


def test_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
  ref, run = tmp_path / 'ref', tmp_path / 'run'
  subprocess.run(_command(ref), env=_env(), cwd=REPO, check=True, capture_output=True)

  proc = subprocess.Popen(_command(run), env=_env(), cwd=REPO, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if 'teacher_finetune step 5/' in line:
      proc.send_signal(signal.SIGTERM)
      break
  _, rest = proc.communicate(timeout=300)
  log = ''.join(seen) + rest
  assert proc.returncode == preemption.EXIT_CODE, log[-3000:]
  stopped = int(sorted(os.listdir(run / 'teacher_finetune' / 'ckpt'), key=int)[-1])
  assert 5 <= stopped < 32, stopped  # mid-epoch, with the step's checkpoint
  assert f'checkpoint saved at step {stopped}' in log
  assert not (run / 'teacher_finetune' / 'done.json').exists()

  resumed = subprocess.run(_command(run), env=_env(), cwd=REPO, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from step {stopped}' in resumed.stderr
  steps, losses = _losses(run)
  ref_steps, ref_losses = _losses(ref)
  assert steps == ref_steps == list(range(1, STEPS + 1))  # every step once, none repeated
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)


def test_watcher_flags_a_signal_and_restores_the_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) is before
