"""Model families, chosen by name from the config (``config.model.family``)."""
from faceflax.models import mae

FAMILIES = {'mae': mae}


def get(family: str):
  if family not in FAMILIES:
    raise ValueError(f'unknown model family {family!r}; known: {sorted(FAMILIES)}')
  return FAMILIES[family]
