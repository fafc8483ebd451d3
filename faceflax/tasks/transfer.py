"""Transfer benchmark: any pretrained MAE ViT backbone of this repo on downstream face tasks.

The backbone is the MAE params of a finished stage (``backbone.workdir``/``backbone.stage``,
newest checkpoint; ``params['mae']``, ``params['student']`` or the params themselves), or a
random init when ``backbone.workdir`` is empty (the scratch baseline). Features are the
mean-pooled final encoder tokens of the unmasked image.

For each task of ``config.tasks`` (see ``TASKS``), each protocol of ``config.protocols``:
  linear    features of every train and val face, standardised with train statistics;
            closed-form ridge regression, lambda by exact leave-one-out error on the fitted
            rows (regression), or an L-BFGS-fitted multinomial / independent logistic
            regression (classification / multilabel); val metrics
  fewshot   the same probe on a seeded class-balanced (classification) or uniform
            (multilabel, regression) subset of the train rows; mean and std over seeds.
            The features keep the statistics of the whole train split (no labels used)
  finetune  backbone + fresh Dense head trained with the task loss as stage
            ``finetune_<task>`` (checkpointed and resumed like every stage), scored on val
-> ``<workdir>/results.json`` {task: {protocol: {metric: value, ..., n_train, n_val}},
   'backbone': {...}, 'seconds': {...}} and a table in the log and ``results.md``.
"""
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from faceflax import backbones, config_checks, downstream, probes, reports
from faceflax.data import align as align_lib, pipeline, records
from faceflax.models import mae
from faceflax.train import checkpoint, evaluation, job as job_lib, loop, mesh as mesh_lib, optim
from faceflax.train import stages as stages_lib, state as state_lib

PROTOCOLS = ('linear', 'fewshot', 'finetune')


TASKS = {
    'expression': downstream.TaskSpec('fer2013', ('label',), 'classification', 'accuracy', True,
                           num_classes=7, class_names=('angry', 'disgust', 'fear', 'happy', 'sad',
                                                       'surprise', 'neutral')),
    'attributes': downstream.TaskSpec('celeba_id', (), 'multilabel', 'mean_accuracy', True),
    'age': downstream.TaskSpec('utkface', ('age',), 'regression', 'mae', False, loss='l1'),
    'beauty': downstream.TaskSpec('scut_fbp5500', ('score',), 'regression', 'pc', True, loss='mse'),
}


def stage_name(task: str) -> str:
  return f'finetune_{task}'


def check_config(config) -> None:
  """Rejects unknown names and bad settings before any data is read or step compiled."""
  stages_lib.parse(config.protocols, PROTOCOLS, 'protocols', required=True)
  for name in stages_lib.parse(config.tasks, list(TASKS), 'tasks', required=True):
    spec = TASKS[name]
    if spec.kind not in downstream.KINDS or (spec.kind == 'regression'
                                             and spec.loss not in ('mse', 'l1')):
      raise ValueError(f'TASKS[{name!r}]: kind {spec.kind!r} / loss {spec.loss!r} unknown')
  if config.fewshot.seeds < 1:
    raise ValueError(f'fewshot.seeds={config.fewshot.seeds}: must be >= 1')
  if config.backbone.workdir and not config.backbone.stage:
    raise ValueError('backbone.workdir is set but backbone.stage is empty')
  config_checks.check_mae(mae.from_config(config.backbone.model, config.backbone.image_size),
                         'backbone.model')


# ----------------------------------------------------------------------------- data

def task_dir(config, name: str) -> str:
  """The dataset of task ``name``: ``data.dirs.<name>`` (a folder or store under
  ``data.root``, an absolute path, or 'tfds:NAME[/CONFIG]')."""
  return records.dataset_path(config.data.dirs.get(name, TASKS[name].data), config.data.root,
                              config.data.get('tfds_data_dir', ''))


def load_task(config, name: str) -> downstream.TaskData:
  d = config.data
  return downstream.load(name, TASKS[name], task_dir(config, name), d.train_split, d.eval_split,
                         d.max_train, d.max_val, config.seed)


# ----------------------------------------------------------------------------- features

def feature_fn(model: mae.MAE, mesh):
  """Jitted (params, images) -> mean-pooled final encoder tokens, unmasked."""
  return job_lib.replicated_jit(lambda p, x: model.apply({'params': p}, x)['pooled'], mesh)


# ----------------------------------------------------------------------------- heads

def head_facts(data: downstream.TaskData) -> dict:
  """What a fine-tuned head takes from its training data (``stages.record_facts``), so that
  predicting needs only the workdir: its width, label columns, class names, the train mean
  and sd its regression outputs are decoded with, and the folder name that picks predict's
  alignment template."""
  mean, sd = downstream.target_stats(data)
  names = list(data.class_names) if data.spec.kind == 'classification' else []
  return {'out_dim': data.out_dim, 'columns': list(data.columns), 'class_names': names,
          'target_mean': mean, 'target_sd': sd, 'dataset': align_lib.folder_name(data.dir)}


# ----------------------------------------------------------------------------- fine-tuning

def head_module(out_dim: int) -> nn.Dense:
  return nn.Dense(out_dim, kernel_init=nn.initializers.zeros, name='head')


def finetune_forward(model: mae.MAE, out_dim: int, params, images, train=False, rng=None):
  rngs = {'dropout': rng} if rng is not None else {}
  pooled = model.apply({'params': params['backbone']}, images, train=train, rngs=rngs)['pooled']
  return head_module(out_dim).apply({'params': params['head']}, pooled)


def finetune_stage(name, model: mae.MAE, spec: downstream.TaskSpec, out_dim: int, pretrained,
                   config) -> loop.Stage:
  """Backbone + head with the task loss, layer-wise lr decay as in fbp_kd fine-tuning; the
  backbone's parameters may be split over the mesh's 'model' axis like fbp_kd's."""
  cfg, size = config.finetune, config.backbone.image_size
  kind = spec.kind

  def init_params_fn(rng):
    # ``pretrained`` is a complete MAE tree (load_backbone): no second backbone init.
    params = mae.init_params(model, rng, size) if pretrained is None else pretrained
    head = head_module(out_dim).init(rng, jnp.zeros((1, model.width)))['params']
    return {'backbone': params, 'head': head}

  def layer(path):  # the head trains at the top rate, like fbp_kd's score head
    if path.startswith('backbone/'):
      return mae.layer_id(path[len('backbone/'):], model.depth)
    return model.depth + 1

  template = jax.eval_shape(init_params_fn, jax.random.key(0))
  tx, sched = optim.adamw(cfg, cfg.steps, template, layer, model.depth + 1)
  init_fn = lambda rng: state_lib.init_state(init_params_fn(rng), tx)

  def loss_fn(params, batch, rng):
    out = finetune_forward(model, out_dim, params, batch['image'], train=True, rng=rng)
    return downstream.task_loss(kind, spec.loss, out, batch['target']), {}

  axes = {'backbone': mae.param_axes(model, size),
          'head': mesh_lib.unsplit_axes(template['head'])}
  # 'target': one 0/1 per attribute (multilabel), else a class index or a value per face
  target = (out_dim,) if kind == 'multilabel' else ()
  return loop.train_stage(name, cfg, (tx, sched), init_fn, loss_fn, size, {'target': target},
                          param_axes=axes)


def finetune_batches(data: downstream.TaskData, config):
  """The task's train faces with the head's targets (regression: standardised)."""
  mean, sd = downstream.target_stats(data)
  target = data.y_train if data.spec.kind != 'regression' else (data.y_train - mean) / sd
  return pipeline.train_batches(config, data.train.images, {'target': target},
                                batch_size=config.finetune.batch_size, pp=config.data.train_pp,
                                seed=config.seed + 1)


# ----------------------------------------------------------------------------- the job

class Job(job_lib.Job):
  """One backbone; per task its data, features and (lazily) its fine-tuning stage.

  ``restore_only`` never trains: fine-tuning stages are only restored (``--mode=eval``,
  ``--mode=predict``).
  """

  STAGES = tuple(stage_name(t) for t in TASKS)
  check_config = staticmethod(check_config)

  def __init__(self, config, workdir: str, restore_only: bool = False,
               backbone: bool | None = None):
    """``backbone=False``: no backbone params (``self.params`` None, ``self.backbone`` {}):
    restoring the fine-tuned stages, which hold the whole backbone, does not need them;
    None: whether the backbone's checkpoint is there (predicting without it)."""
    self.tasks = stages_lib.parse(config.tasks, list(TASKS), 'tasks', required=True)
    self.protocols = stages_lib.parse(config.protocols, PROTOCOLS, 'protocols', required=True)
    super().__init__(config, workdir, restore_only)
    b = self.config.backbone
    if backbone is None:
      backbone = not b.workdir or os.path.isdir(os.path.join(b.workdir, b.stage, 'ckpt'))
    self.model, self.params, self.backbone = (
        backbones.load_backbone(self.config, self.mesh) if backbone else
        (mae.from_config(b.model, b.image_size, self.dtype),
         None, {}))
    self.features = feature_fn(self.model, self.mesh)
    self._data = {}

  def listed(self) -> list[str]:
    """The fine-tuning stages of the listed tasks (run when the protocol asks for them)."""
    return [stage_name(t) for t in self.tasks]

  def data(self, task: str) -> downstream.TaskData:
    if task not in self._data:
      self._data[task] = load_task(self.config, task)
    return self._data[task]

  def build(self, name, upstream):
    task = name[len('finetune_'):]
    if not upstream:  # the head's width from the recorded facts: restoring reads no data
      return finetune_stage(name, self.model, TASKS[task], self.head_facts(task)['out_dim'],
                            None, self.config)
    data = self.data(task)
    stages_lib.record_facts(self.workdir, **{name: head_facts(data)})
    return finetune_stage(name, self.model, data.spec, data.out_dim, self.params, self.config)

  def batches(self, name):
    return finetune_batches(self.data(name[len('finetune_'):]), self.config)

  def head_facts(self, task: str) -> dict:
    """``head_facts`` of a fine-tuned stage, as recorded where it trained, else from the data."""
    name = stage_name(task)
    where = os.path.dirname(stages_lib.stage_dir(self.workdir, self.config.reuse_from, name))
    return stages_lib.model_facts(where).get(name) or head_facts(self.data(task))

  def run_task(self, task: str, seconds: dict) -> dict:
    """Every requested protocol on one task; the fine-tuning stage runs or is restored."""
    data, c = self.data(task), self.config
    sizes = {'n_train': len(data.train), 'n_val': len(data.val)}
    out, preds = {'train_prior': {**downstream.train_prior(data), **sizes}}, {}
    if {'linear', 'fewshot'} & set(self.protocols):
      t = time.perf_counter()
      x_train, x_val = probes.standardize(*(
          evaluation.predict_images(self.features, self.params, part.images, c, self.mesh)
          for part in (data.train, data.val)))
      seconds[f'{task}/features'] = time.perf_counter() - t
      if 'linear' in self.protocols:
        t = time.perf_counter()
        scores, reg, preds['linear'] = downstream.linear_probe(data, x_train, x_val, c.linear)
        out['linear'] = {**scores, **reg, **sizes}
        seconds[f'{task}/linear'] = time.perf_counter() - t
      if 'fewshot' in self.protocols:
        t = time.perf_counter()
        scores, preds['fewshot'] = downstream.fewshot_probe(data, x_train, x_val, c)
        out['fewshot'] = {**scores, 'n_val': len(data.val)}
        seconds[f'{task}/fewshot'] = time.perf_counter() - t
    name = stage_name(task)
    if 'finetune' in self.protocols and (not self.restore_only or self.finished(name)):
      scores, preds['finetune'] = self.score_finetuned(data)
      out['finetune'] = {**scores, **sizes}
      seconds[f'{task}/finetune'] = stages_lib.seconds(self.workdir, c.reuse_from, [name]).get(
          name, float('nan'))
    elif 'finetune' in self.protocols:
      logging.warning('%s: stage %s is not finished; its fine-tuning is not scored', task, name)
    self.write_reports(data, preds)
    return out

  def write_reports(self, data: downstream.TaskData, preds: dict) -> None:
    """One picture of the val predictions per protocol -> reports/ (process 0 writes)."""
    for protocol, pred in preds.items():
      title = f'{data.name}, {protocol}' + (' (first draw)' if protocol == 'fewshot' else '')
      suffix, image = downstream.report_image(data, pred, f'{title} ({REPORT_PREFIX})')
      reports.save(self.workdir, f'{REPORT_PREFIX}_{data.name}_{protocol}_{suffix}', image,
                   self.writer)

  def score_finetuned(self, data: downstream.TaskData) -> tuple[dict, np.ndarray]:
    """(val scores, val predictions) of the task's fine-tuned model."""
    params = self.state(stage_name(data.name))['params']
    forward = job_lib.replicated_jit(functools.partial(finetune_forward, self.model,
                                                       data.out_dim), self.mesh)
    outputs = evaluation.predict_images(forward, params, data.val.images, self.config, self.mesh)
    pred = downstream.decode(data.spec.kind, outputs, downstream.target_stats(data))
    return downstream.score(data.spec, pred, data.y_val), pred

  # ---------------------------------------------------------------- the modes

  @classmethod
  def check_data(cls, config, workdir: str) -> None:
    """Reads (and so checks) every task's train and val split before the first task runs."""
    del workdir
    for name in stages_lib.parse(config.tasks, list(TASKS), 'tasks', required=True):
      load_task(config, name)

  @classmethod
  def train_and_evaluate(cls, config, workdir: str) -> dict:
    return cls(config, workdir).run('results.json')

  @classmethod
  def run_eval(cls, config, workdir: str) -> dict:
    """Re-runs the probes and scores the finished fine-tuning stages -> ``W/eval.json``."""
    return cls(config, workdir, restore_only=True, backbone=True).run('eval.json')

  def run(self, filename: str) -> dict:
    """All tasks x protocols; the results file is rewritten after every task."""
    start = time.perf_counter()
    os.makedirs(self.workdir, exist_ok=True)
    backbones.check_backbone(self.workdir, self.backbone, self.config.seed,
                             record=not self.restore_only)
    results, seconds = {}, {}
    for task in self.tasks:
      results[task] = self.run_task(task, seconds)
      results.update(backbone=self.backbone,
                     seconds={**seconds, 'total_this_run': time.perf_counter() - start})
      if self.restore_only:
        results['restored'] = self.restored
      stages_lib.write_results(os.path.join(self.workdir, filename), results)
    table = results_table(results, self.tasks, self.protocols)
    logging.info('transfer benchmark (%s):\n%s', backbones.describe_backbone(self.backbone), table)
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, os.path.splitext(filename)[0] + '.md'), 'w') as f:
        f.write(f'Backbone: {backbones.describe_backbone(self.backbone)}\n\n{table}\n')
    job_lib.log_scalars(self.writer, {
        f'transfer/{t}/{p}_{TASKS[t].metric}': r[TASKS[t].metric]
        for t in self.tasks for p, r in results[t].items() if TASKS[t].metric in r})
    self.writer.flush()
    return results

  def predict_heads(self):
    """The fine-tuned heads (finished ``finetune_<task>`` stages) on new photos; CSV columns
    per task: expression: the class and each class's probability; attributes: each
    attribute's probability; age, beauty: the predicted value. Each task's faces are aligned
    like its dataset's chips."""
    from faceflax import predict as predict_lib  # pylint: disable=g-import-not-at-top  # TensorFlow
    b = self.config.backbone
    if self.backbone:
      backbones.check_backbone(self.workdir, self.backbone, self.config.seed, record=False)
    else:  # the fine-tuned stages hold the whole backbone
      logging.info('backbone: %s is not here; predicting with the backbone held by the '
                   'fine-tuned stages (not checked against backbone.json)',
                   os.path.join(b.workdir, b.stage))
    heads, classes = [], {}
    for task in self.tasks:
      if not self.finished(stage_name(task)):
        logging.warning('%s: stage %s is not finished in %s; not predicted', task,
                        stage_name(task), self.workdir)
        continue
      facts = self.head_facts(task)
      fn = job_lib.replicated_jit(functools.partial(finetune_forward, self.model,
                                                    facts['out_dim']), self.mesh)
      if TASKS[task].kind == 'classification':
        classes[task] = tuple(facts['class_names'])
      params = self.state(stage_name(task))['params']
      heads.append(predict_lib.Head(
          lambda x, fn=fn, p=params, task=task, facts=facts: downstream.head_outputs(
              TASKS[task].kind, task, facts, fn(p, x)),
          b.image_size, facts['dataset'], self.config.data.eval_pp))
    if not heads:
      raise checkpoint.CheckpointError(f'no finished fine-tuning stage (finetune_<task> of '
                                       f'tasks {self.tasks}) in {self.workdir}: nothing to '
                                       'predict with')

    def columns(outputs):  # a classification task's class name first, then its probabilities
      table = {}
      for name, value in outputs.items():
        for task, names in classes.items():
          if name == f'{task}_p_{names[0]}':
            p = np.stack([outputs[f'{task}_p_{n}'] for n in names], axis=1)
            table[task] = np.asarray(names)[np.nan_to_num(p).argmax(-1)]
        table[name] = value
      return table
    return heads, columns


# ----------------------------------------------------------------------------- reporting

# The evaluate-stage prefix of the other tasks; --mode=eval scores the same val splits, so
# it rewrites the same files.
REPORT_PREFIX = 'eval'


def _cell(entry: dict | None, metric: str) -> str:
  if not entry:
    return '-'
  if f'{metric}_std' in entry:
    return f'{entry[metric]:.3f} ± {entry[metric + "_std"]:.3f}'
  return f'{entry[metric]:.3f}'


def results_table(results: dict, tasks, protocols) -> str:
  """Markdown table: one row per task, the primary metric of each protocol."""
  cols = ['train_prior', *protocols]
  lines = ['| task | metric | ' + ' | '.join(cols) + ' | n train / val |',
           '|---' * (len(cols) + 3) + '|']
  for task in tasks:
    spec, r = TASKS[task], results[task]
    arrow = 'higher is better' if spec.higher_is_better else 'lower is better'
    cells = [_cell(r.get(p), spec.metric) for p in cols]
    n = r['train_prior']
    lines.append(f'| {task} | {spec.metric} ({arrow}) | ' + ' | '.join(cells)
                 + f' | {n["n_train"]} / {n["n_val"]} |')
  return '\n'.join(lines)
