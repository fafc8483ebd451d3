"""Methods, chosen by name from ``config.task``; each module has its stages and steps.

A task module exposes ``check_config(config)`` (inconsistent settings, raised
before any data is read or step compiled), ``train_and_evaluate(config, workdir)``
and ``evaluate(config, workdir)``; ``check_data(config, workdir)`` reads every split the
listed stages use, before the first one trains.
``predict_photos(config, workdir, input_path, output, align)`` scores new photos
(``--mode=predict``, through ``faceflax.predict``); lqfr_kd also has
``verify(config, workdir, input_path, align)``.
"""
import glob
import importlib
import json
import os

TASKS = {'fbp_kd': 'faceflax.tasks.fbp_kd', 'lqfr_kd': 'faceflax.tasks.lqfr_kd',
         'age_mtmsa': 'faceflax.tasks.age_mtmsa', 'face_prior': 'faceflax.tasks.face_prior',
         'transfer': 'faceflax.tasks.transfer'}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; known: {sorted(TASKS)}')
  return importlib.import_module(TASKS[name])


def trained_by(workdir: str) -> str | None:
  """The task whose run ``workdir`` holds: its recorded config.json, else (runs from before
  it was recorded) the task whose stage folders are there; None for an empty workdir."""
  path = os.path.join(workdir, 'config.json')
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f).get('task')
  for name in TASKS:
    stages = getattr(get(name), 'STAGES', ())
    if any(os.path.isdir(os.path.join(workdir, s, 'ckpt')) for s in stages):
      return name
  if glob.glob(os.path.join(workdir, 'finetune_*', 'ckpt')):
    return 'transfer'
  return None
