"""Model families, chosen by name from the config (``config.model.family``)."""
from faceflax.models import mae
from faceflax.models import resnet_msa
from faceflax.models import resnext_cbam

FAMILIES = {'mae': mae, 'resnet_msa': resnet_msa, 'resnext_cbam': resnext_cbam}


def get(family: str):
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; known: {sorted(FAMILIES)}')
  return FAMILIES[family]
