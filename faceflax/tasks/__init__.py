"""Methods, chosen by name from ``config.task``; each module has its stages and steps.

A task module exposes ``check_config(config)`` (inconsistent settings, raised
before any data is read or step compiled), ``train_and_evaluate(config, workdir)``
and ``evaluate(config, workdir)``; ``check_data(config, workdir)``, where a task
would otherwise read a split only after training, reads every split first.
``predict_photos(config, workdir, input_path, output, align)`` scores new photos
(``--mode=predict``, through ``faceflax.predict``); lqfr_kd also has
``verify(config, workdir, input_path, align)``.
"""
import importlib

TASKS = {'fbp_kd': 'faceflax.tasks.fbp_kd', 'lqfr_kd': 'faceflax.tasks.lqfr_kd',
         'age_mtmsa': 'faceflax.tasks.age_mtmsa', 'face_prior': 'faceflax.tasks.face_prior',
         'transfer': 'faceflax.tasks.transfer'}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; known: {sorted(TASKS)}')
  return importlib.import_module(TASKS[name])
