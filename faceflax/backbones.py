"""Pretrained MAE backbones from the finished stages of any workdir (the transfer benchmark's
backbone, or any fine-tuning from another run): found in each params layout, loaded
strictly, described, and checked to be the one a workdir's results were made with.
"""
import json
import os

import jax
from absl import logging

from faceflax.models import mae
from faceflax.train import checkpoint, loop, mesh as mesh_lib, precision, stages as stages_lib
from faceflax.train import state as state_lib


def select_mae_params(params) -> tuple[dict, str]:
  """The MAE params of a stage's params and their layout ('mae', 'student' or 'plain')."""
  for key in ('mae', 'student'):  # face-prior pretraining / fbp_kd student_kd
    if key in params:
      return params[key], key
  return params, 'plain'


def stage_mae_params(workdir: str, stage: str, mesh, what: str) -> tuple[dict, str, str, int]:
  """(MAE params, layout, checkpoint directory, step) of stage ``stage`` of ``workdir``, as
  saved (its own tree; the caller loads them strictly into its model)."""
  directory = os.path.join(workdir, stage, 'ckpt')
  if not loop.is_done(workdir, stage):
    logging.warning('%s: stage %s of %s is not finished; using its newest checkpoint',
                    what, stage, workdir)
  step, state = checkpoint.load_raw(directory, mesh_lib.replicated(mesh), what)
  if not isinstance(state, dict) or 'params' not in state:
    raise checkpoint.CheckpointError(f'{what}: {directory} holds no train state with params')
  params, layout = select_mae_params(state['params'])
  return params, layout, directory, int(step)


def load_backbone(config, mesh) -> tuple[mae.MAE, dict, dict]:
  """(model, MAE params, report); a model that does not fit the checkpoint is an error."""
  b = config.backbone
  model = mae.from_config(b.model, b.image_size, precision.compute_dtype(config.train))
  params = mae.init_params(model, jax.random.key(config.seed), b.image_size)  # eager: cached ops
  report = {'workdir': b.workdir, 'stage': b.stage if b.workdir else '',
            'model': b.model.to_dict(), 'image_size': b.image_size, 'feature_dim': model.width,
            'encoder_params': loop.count_params(
                {k: v for k, v in params.items() if k in ('embed', 'encoder')})}
  if not b.workdir:
    logging.info('backbone: no backbone.workdir, a randomly initialised %s (scratch baseline)',
                 b.model.variant)
    return model, mesh_lib.put_replicated(params, mesh), {**report, 'layout': 'scratch',
                                                          'step': 0}
  pretrained, layout, directory, step = stage_mae_params(b.workdir, b.stage, mesh, 'backbone')
  try:
    params, loaded = state_lib.load_pretrained(params, pretrained, b.reinit,
                                               where=f'{directory} step {step}')
  except state_lib.PretrainedMismatch as e:
    raise checkpoint.CheckpointError(
        f'backbone: backbone.model ({b.model.to_dict()}, image_size {b.image_size}) does not '
        f'match the {layout!r} params: {e} Set --config.backbone.model.* like the stage\'s '
        'model config.') from None
  logging.info('backbone: %s params of %s step %d; %d weight(s) left at init (%s)',
               layout, directory, step, len(loaded['kept_init']), b.reinit)
  params = mesh_lib.put_replicated(params, mesh)
  return model, params, {**report, 'layout': layout, 'step': int(step), 'loaded': loaded}


def check_backbone(workdir: str, backbone: dict, seed: int, record: bool) -> None:
  """One workdir, one backbone: its fine-tuned stages must not be mixed with another's."""
  path = os.path.join(workdir, 'backbone.json')
  key = json.loads(json.dumps({**{k: backbone[k] for k in (
      'workdir', 'stage', 'step', 'layout', 'model', 'image_size')}, 'seed': seed}))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != key:
      raise ValueError(f'{workdir} holds the transfer results of another backbone ({old}); '
                       f'this run\'s is {key}: use a new --workdir')
  elif record:
    stages_lib.write_json(path, key)


def describe_backbone(b: dict) -> str:
  m = b['model']
  model = f'{m["variant"]} ViT, {m["stem"]} stem, patch {m["patch"]}, {b["image_size"]} px'
  if b['layout'] == 'scratch':
    return f'{model}, random init (scratch)'
  return f'{model}, {b["workdir"]}/{b["stage"]} step {b["step"]} ({b["layout"]} params)'
