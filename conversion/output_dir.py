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
  try:
    yield tmp
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
