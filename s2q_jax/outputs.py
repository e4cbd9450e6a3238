"""Writing outputs all or nothing, with I/O failures reported as one line naming the path.

Every file is written under a temporary name in the same folder and renamed
over the target only once complete, so a full disk or a filesystem that turns
read-only mid-write leaves the previous version (or nothing), never a
truncated file that a rerun would trust.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from s2q_jax.errors import UserError


def io_error(path: str, e: OSError, verb: str = "write") -> UserError:
  """`cannot write PATH: No space left on device` (the target's path, not a temporary one)."""
  return UserError(f"cannot {verb} {path}: {e.strerror or e}")


def write_failure(e: Exception) -> str | None:
  """The OS's reason when `e` is a failed write (OSError, or safetensors' wrapped I/O error)."""
  if isinstance(e, OSError):
    return e.strerror or str(e)
  text = str(e)  # SafetensorError: "Error while serializing: I/O error: No space left on device (os error 28)"
  if type(e).__name__ == "SafetensorError" and "I/O error: " in text:
    return text.rsplit("I/O error: ", 1)[1].split(" (os error")[0]
  return None


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path`; it replaces `path` only if the block succeeds."""
  base, ext = os.path.splitext(path)
  tmp = f"{base}.partial-{os.getpid()}{ext}"  # keeps the extension: np.savez appends .npz
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    raise io_error(path, e) from None
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  """Strict JSON (no NaN/Infinity, which strict parsers reject): ±inf becomes null."""
  write_text(path, json.dumps(strict(obj, os.path.basename(path)), indent=2, allow_nan=False))


def strict(obj: Any, where: str = "") -> Any:
  """`obj` with ±inf floats as None; a NaN is a bug upstream and stops with its key path."""
  if isinstance(obj, float) and not np.isfinite(obj):
    if np.isnan(obj):
      raise UserError(f"NaN at {where}: the stage that computed it should have stopped the "
                      "job; please report this")
    return None
  if isinstance(obj, Mapping):
    return {k: strict(v, f"{where}.{k}") for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  return obj


def write_with(path: str, writer: Callable[[str], None]) -> None:
  """`writer(tmp_path)` writes the file; it appears at `path` only when complete."""
  with atomic_path(path) as tmp:
    writer(tmp)


def load_npz(path: str, key: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
  """The arrays of a cache written by `save_npz` with this very `key`; None if absent.

  A cache made from other inputs (or by an older version, without a key) is
  reported and ignored: the caller recomputes and `save_npz` replaces it.
  """
  from s2q_jax import fingerprint  # pylint: disable=import-outside-toplevel
  if not path or not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      stored = json.loads(str(f["key"])) if "key" in f.files else {}
      if stored == json.loads(json.dumps(key, sort_keys=True)):
        print(f"  reusing {path}")
        return {k: f[k] for k in f.files if k != "key"}
  except (OSError, ValueError, EOFError) as e:
    print(f"  {path} is unreadable ({e}); recomputing")
    return None
  why = fingerprint.describe(stored, key) if stored else "no fingerprint (older version)"
  print(f"  {path} was made with {why}; recomputing")
  return None


def save_npz(path: str, arrays: Mapping[str, np.ndarray], key: Mapping[str, Any]) -> None:
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare name
      np.savez(f, key=np.asarray(json.dumps(key, sort_keys=True)), **arrays)
  write_with(path, write)
