"""`python -m faceflax.data.prepare SOURCE [OUT]`: write a dataset as a record store, once.

SOURCE is a folder-format dataset (images/ + labels.csv; OUT is required: the store
is written there as array_record shards, every split, every labels.csv column), or an
insightface pack (train.rec + train.idx; the images stay in train.rec, the index goes to
OUT, by default SOURCE/faceflax_records). Every image is screened once here, so runs
start from the manifest instead; then train with ``--config.data.dir=OUT`` (a pack's
own folder also works once it holds its index). README "Data at scale".
"""
from absl import app, flags, logging

from faceflax.data import bad_data, records
from faceflax.data.errors import DataError

_SHARD = flags.DEFINE_integer('records_per_shard', 100_000, 'Records per array_record shard.')
_SKIP_BAD = flags.DEFINE_bool('skip_bad', False, 'Leave out (and list in the manifest) images '
                              'that do not decode, instead of stopping at them.')


def prepare(source, out=None):
  with bad_data.policy(skip=_SKIP_BAD.value):
    if records.is_insightface_pack(source):
      return records.prepare_insightface(source, out)
    if out is None:
      raise DataError('a folder-format SOURCE needs OUT, the folder to write the store to')
    return records.prepare_folder(source, out, records_per_shard=_SHARD.value)


def main(argv):
  if len(argv) not in (2, 3):
    raise app.UsageError('usage: python -m faceflax.data.prepare SOURCE [OUT]')
  try:
    out = prepare(*argv[1:])
  except DataError as e:
    logging.error('%s', e)
    raise SystemExit(1) from None
  print(out)


if __name__ == '__main__':
  app.run(main)
