"""All-or-nothing output folders: write into a hidden sibling, rename at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_output_dir(dst: str, *, overwrite: bool = False):
  """Yields a temporary folder that becomes `dst` only if the block succeeds.

  On any error the temporary folder is removed, so a failed conversion leaves
  nothing behind (and an existing `dst` untouched).
  """
  dst = os.path.abspath(dst)
  if os.path.exists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists; choose another --dst or pass --overwrite")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  try:
    yield tmp
    # mkdtemp and some writers create owner-only files; give the result normal permissions.
    os.chmod(tmp, 0o777 & ~umask)
    for root, dirs, files in os.walk(tmp):
      for name in dirs:
        os.chmod(os.path.join(root, name), 0o777 & ~umask)
      for name in files:
        os.chmod(os.path.join(root, name), 0o666 & ~umask)
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
