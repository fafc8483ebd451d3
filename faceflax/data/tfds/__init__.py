"""TFDS builders (manual download) for the official dataset releases faceflax reads.

Importing this package registers them: scut_fbp5500, utkface, morph2, adience,
fer2013, celeba. Each parses its files with the faceflax reader of that layout,
so a cached dataset has the same rows, splits and labels as the reader. Build with
  python -m faceflax.data.tfds scut_fbp5500 --manual_dir=DIR
or `tfds build --imports=faceflax.data.tfds ...` (data/README.md, "Caching with TFDS").
"""

from faceflax.data.tfds import adience, celeba, fer2013, morph2, scut_fbp5500, utkface

__all__ = ['adience', 'celeba', 'fer2013', 'morph2', 'scut_fbp5500', 'utkface']
