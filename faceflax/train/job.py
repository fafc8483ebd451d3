"""The run skeleton every task shares: stages trained or restored, evaluation, results, predict.

A task is a ``Job`` subclass that declares what is specific to its method:

  STAGES             its trained stages, in order ('evaluate' is always known)
  check_config       inconsistent settings, before any data is read (a staticmethod)
  data_reads         {stage: read} of every split a listed stage uses (``check_data``)
  build(name, upstream)  the stage's ``loop.Stage`` without batches; ``upstream`` False:
                     only enough to restore its checkpoint (no teacher, no pretrained weights)
  batches(name)      the stage's batches (``start_step -> iterator``), reading its data
  evaluate(split, prefix)  the results of its trained models on a split, reports under prefix
  log_results        its scores in the log and TensorBoard (a staticmethod)
  predict_heads()    the ``predict.Head``s and CSV columns of ``--mode=predict``

and this module does the rest the same way for every task: which stages run, reuse of
finished ones (``config.reuse_from``), restore-only jobs for eval / predict, the results
files with stage times and what each stage loaded, and the predict plumbing.
README "Layout" walks through adding a method.
"""
import dataclasses
import functools
import os
import time

import jax
from etils import epy

with epy.lazy_imports():  # clu's writers load TensorFlow: only a job that writes needs them
  from clu import metric_writers

from faceflax.train import checkpoint, loop, mesh as mesh_lib, precision, stages as stages_lib

EVALUATE = 'evaluate'


class Job:
  """One task's run in ``workdir``; ``restore_only``: every stage is loaded, none trained."""

  STAGES: tuple = ()

  def __init__(self, config, workdir: str, restore_only: bool = False):
    self.check_config(config)
    self.config, self.restore_only = config, restore_only
    self.workdir = workdir
    self.mesh = mesh_lib.make_mesh(config.get('mesh'))
    self._states = {}

  # ---------------------------------------------------------------- what a task declares

  @staticmethod
  def check_config(config) -> None:
    del config

  @staticmethod
  def data_reads(config, workdir: str) -> dict:
    """{stage: read}: each listed stage's read runs before the first stage trains."""
    del config, workdir
    return {}

  def build(self, name: str, upstream: bool) -> loop.Stage:
    raise NotImplementedError

  def batches(self, name: str):
    raise NotImplementedError

  def evaluate(self, split: str, prefix: str) -> dict:
    raise NotImplementedError

  @staticmethod
  def log_results(results: dict, writer) -> None:
    del results, writer

  def predict_heads(self) -> tuple[list, object]:
    """(heads, columns) for ``predict.run``; columns None keeps the heads' outputs as they are."""
    raise NotImplementedError

  def record_facts(self) -> None:
    """Writes what the models take from the training data (``stages.record_facts``)."""

  def eval_name(self) -> str:
    """The stem of ``--mode=eval``'s results file and report prefix."""
    return 'eval_' + os.path.basename(os.path.normpath(self.config.data.dir))

  # ---------------------------------------------------------------- shared

  @property
  def dtype(self):
    """The models' compute dtype (``train.precision``; parameters stay fp32)."""
    return precision.compute_dtype(self.config.train)

  @classmethod
  def known_stages(cls) -> tuple:
    return (*cls.STAGES, EVALUATE)

  def listed(self) -> list[str]:
    """The stages ``config.stages`` lists (checked against the known ones)."""
    return stages_lib.parse(self.config.stages, self.known_stages())

  def trains(self, name: str) -> bool:
    """Whether this job runs stage ``name``: listed, unfinished and not restore-only."""
    return (not self.restore_only and name in self.listed()
            and not loop.is_done(self.workdir, name))

  def stage(self, name: str, restore_only: bool = False, data: bool = True) -> loop.Stage:
    """Stage ``name`` as training builds it; ``data=False``: without its batches (its
    ``batch_spec`` only; bench/bench_steps.py); ``restore_only``: also without upstream
    inputs, enough to load its checkpoint (reads no data)."""
    if name not in self.STAGES:
      raise KeyError(name)
    st = self.build(name, upstream=not restore_only)
    if data and not restore_only:
      st = dataclasses.replace(st, batches=self.batches(name))
    return st

  def state(self, name: str) -> dict:
    """The final train state of stage ``name``: run when listed and unfinished, else restored
    from its checkpoint (here or in ``config.reuse_from``); once per job."""
    if name not in self._states:
      c = self.config
      if self.trains(name):
        self._states[name] = loop.run(self.stage(name), self.workdir, c.train, self.mesh,
                                      self.writer)
      else:
        st = self.stage(name, restore_only=True)
        self._states[name] = stages_lib.load_state(self.workdir, c.reuse_from, name, st.init_fn,
                                                   self.mesh, self.restored)
    return self._states[name]

  def finished(self, name: str) -> bool:
    """Whether stage ``name`` finished training, here or in ``config.reuse_from``."""
    return stages_lib.finished(self.workdir, self.config.reuse_from, name)

  def provide(self, name: str, state) -> None:
    """Uses ``state`` as the final state of stage ``name`` (tests, benchmarks, notebooks)."""
    self._states[name] = state

  def trained_states(self, names, require_all: bool) -> dict:
    """{stage: final state} of ``names``; unless ``require_all`` (eval, predict), a stage
    that never trained is left out, and one that trained but cannot be read is an error
    unless ``eval.partial``."""
    out = {}
    for name in names:
      try:
        out[name] = self.state(name)
      except checkpoint.CheckpointError as e:
        if require_all:
          raise
        stages_lib.trained_but_unreadable(e, self.workdir, self.config.reuse_from, name,
                                          self.config.eval.get('partial', False))
    if not out:
      raise checkpoint.CheckpointError(f'no trained model ({", ".join(names)}) in {self.workdir}')
    return out

  @functools.cached_property
  def writer(self):
    """TensorBoard from process 0 (the log elsewhere), made on first use: a job that only
    restores its models to predict leaves no event file behind."""
    return metric_writers.create_default_writer(self.workdir,
                                                just_logging=jax.process_index() > 0)

  @functools.cached_property
  def restored(self) -> dict:
    """{stage: checkpoint folder and step} of every stage this job restored (eval JSONs)."""
    return {}

  # ---------------------------------------------------------------- the modes (``app.run``)

  @classmethod
  def check_data(cls, config, workdir: str) -> None:
    """Reads (and so checks) every split the listed stages use, before the first one trains."""
    names = stages_lib.parse(config.stages, cls.known_stages())
    for stage, read in cls.data_reads(config, workdir).items():
      if stage in names:
        read()

  @classmethod
  def train_and_evaluate(cls, config, workdir: str) -> dict:
    """Runs the listed stages in order, then (if listed) scores the models on
    ``data.eval_split`` -> ``<workdir>/results.json``."""
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    job = cls(config, workdir)
    job.record_facts()
    names = job.listed()
    for name in names:
      if name != EVALUATE:
        job.state(name)
    if EVALUATE not in names:
      return {}
    results = job.evaluate(job.config.data.get('eval_split', ''), 'eval')
    reuse = job.config.reuse_from
    results['stage_seconds'] = stages_lib.seconds(workdir, reuse, cls.STAGES)
    loaded = stages_lib.loaded(workdir, reuse, cls.STAGES)
    if loaded:
      results['pretrained'] = loaded
    results['wall_seconds_this_run'] = time.perf_counter() - start
    job.log_results(results, job.writer)
    stages_lib.write_results(os.path.join(workdir, 'results.json'), results)
    return results

  @classmethod
  def run_eval(cls, config, workdir: str) -> dict:
    """Scores the trained models of ``workdir`` (restored, never trained) on ``eval.split``
    of the configured data -> ``<workdir>/<eval_name>.json``."""
    if 'dir' in config.data and not config.data.dir:
      raise ValueError(f'--mode=eval needs --config.data.dir: the dataset to score on '
                       f'(task {config.task})')
    job = cls(config, workdir, restore_only=True)
    name = job.eval_name()
    results = job.evaluate(config.eval.get('split', ''), name)
    job.log_results(results, None)
    results['restored'] = job.restored
    stages_lib.write_results(os.path.join(workdir, f'{name}.json'), results)
    return results

  @classmethod
  def run_predict(cls, config, workdir: str, input_path: str, output: str,
                  align: str = 'auto') -> dict:
    """``--mode=predict``: the restored models' heads on new photos -> CSV (faceflax.predict)."""
    from faceflax import predict  # pylint: disable=g-import-not-at-top  # TensorFlow
    job = cls(config, workdir, restore_only=True)
    heads, columns = job.predict_heads()
    return predict.run(input_path, output, heads, job.mesh, config.eval_batch_size, align,
                       columns)


def replicated_jit(fn, mesh):
  """``jax.jit(fn)`` with outputs replicated over ``mesh`` (evaluation and predict forwards)."""
  return jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))


def log_scalars(writer, scalars: dict) -> None:
  """Final scores to TensorBoard at step 0 (no writer: --mode=eval logs only)."""
  if writer is not None:
    writer.write_scalars(0, scalars)
