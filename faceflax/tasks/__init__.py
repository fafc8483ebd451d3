"""Methods, chosen by name from ``config.task``: the module ``faceflax/tasks/<task>.py`` is
one method's models, steps and metrics, declared on its ``Job`` (a ``faceflax.train.job.Job``,
which runs the modes); lqfr_kd's Job also has ``run_verify``. A new file here is a new task
(README "Layout": adding a method); a dotted ``config.task`` ('my_project.my_task') names a
task module outside this package.
"""
import importlib
import pkgutil


def names() -> list[str]:
  """Every task: the modules of this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))


def get(name: str):
  if '.' in name:  # a task module of another package (a project's own methods)
    try:
      return importlib.import_module(name)
    except ModuleNotFoundError as e:
      raise ValueError(f'task {name!r}: no such module ({e})') from e
  if name not in names():
    raise ValueError(f'unknown task {name!r}; known: {names()} (or a dotted module path)')
  return importlib.import_module(f'{__name__}.{name}')
