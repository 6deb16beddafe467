"""Atomic writes: a reader never sees a half-written file or folder.

Everything is written under a temporary name in the destination's own folder
(same filesystem, so the final `os.replace` / `os.rename` is atomic) and
renamed only when complete; on an error the temporary is removed.
"""
import contextlib
import os
import shutil
import tempfile


def atomic_write(path: str, data: bytes | str, mode: int = 0o644) -> str:
  """Writes `data` to `path` atomically (replacing an existing file); returns `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)  # mkstemp makes it 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


@contextlib.contextmanager
def atomic_folder(path: str, tmp_name: str | None = None):
  """Yields a temporary sibling folder; renamed to `path` when the block succeeds.

  `path` must not exist (a folder is never silently replaced). On an error the
  temporary folder is removed. `tmp_name` fixes the temporary name (several
  processes writing into one folder need the same one); by default it is
  unique to this process."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise FileExistsError(f'{path} already exists; remove it or choose another destination')
  parent, name = os.path.split(path)
  tmp = os.path.join(parent, tmp_name or f'.{name}.incomplete-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):  # rename() would silently replace an empty folder
    raise FileExistsError(f'{path} appeared while writing; the output is in {tmp}')
  os.rename(tmp, path)
