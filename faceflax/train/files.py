"""Safe writes to the workdir: checked up front, atomic, and never half a file."""
import errno
import json
import os
import shutil
import uuid


class WorkdirError(OSError):
  """The workdir (or a stage folder in it) cannot be written; the message says why."""


def check_writable(directory: str, need_bytes: int = 0) -> None:
  """Creates ``directory`` and writes a probe file into it; checks ``need_bytes`` of free space.

  ``os.access`` is not enough: it says yes to root on a read-only mount, and
  nothing about a full disk. Raises WorkdirError naming the directory.
  """
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f'.write-test-{uuid.uuid4().hex}')
    with open(probe, 'wb') as f:
      f.write(b'ok')
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(e.errno, f'workdir {directory} is not writable: '
                       f'{e.strerror or e} ({type(e).__name__})') from e
  free = shutil.disk_usage(directory).free
  if need_bytes and free < need_bytes:
    raise WorkdirError(errno.ENOSPC, f'{directory}: {free / 2 ** 20:.1f} MiB free, a checkpoint '
                       f'needs about {need_bytes / 2 ** 20:.1f} MiB; free some space or use '
                       'another --workdir')


def check_output_file(path: str, flag: str) -> None:
  """``path`` can be written as a file (``flag`` names it in errors), checked before the work
  that produces it: not a folder, its folder writable (created if missing, as the writer
  would), the file itself (when it exists) writable. Writes no file."""
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise WorkdirError(errno.EISDIR, f'{flag}={path} is a folder; name the file to write, '
                       f'e.g. {os.path.join(path, "scores.csv")}')
  try:
    check_writable(os.path.dirname(path))
    existed = os.path.exists(path)
    with open(path, 'a'):
      pass
    if not existed:
      os.remove(path)
  except (OSError, WorkdirError) as e:
    raise WorkdirError(errno.EACCES, f'{flag}={path} cannot be written: {e}') from e


def write_json(path: str, obj) -> None:
  """Writes ``obj`` to ``path`` atomically: a crash or a full disk leaves the old file intact."""
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
