"""Fingerprints of everything that determines a cached or resumable artefact, and their diffs.

A fingerprint is a flat JSON-able {name: value} dict. Artefacts store theirs
next to them (the workdir's `fingerprint.json`, a `key` entry in cached npz
files, `fingerprint` in report.json), so a mismatch can be named in one line:
`describe(old, new)` → "quant.w_bits=4 (now 5)".
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Mapping

from ml_collections import ConfigDict

# Config keys that cannot change any result: where outputs and caches live, how
# GIFs are scaled, XLA's compile cache, the process group and device mesh (within the
# rounding of the reduction order, as the device count), the kernels that rerun
# the exported checkpoint, and model.path (the model files' digest stands for it,
# so a moved folder still matches). A list of what does NOT matter, so that a key
# added later counts by default instead of being silently ignored.
IGNORED_KEYS = frozenset({
    "workdir", "compilation_cache", "model.path", "inference.backend", "eval.gif_scale",
    "eval.fp_videos_path", "calib.pool_path", "mesh.coordinator", "mesh.num_processes",
    "mesh.process_id", "mesh.model",
})

# Weight files up to this size are hashed byte for byte (the embedded model's
# 10 MB take ~20 ms); bigger ones, e.g. the shards of CogVideoX-5B (tens of GB,
# minutes to read), by name, size and modification time instead: copying such a
# file changes its mtime and so forces a recomputation, which is the safe side.
FULL_HASH_MAX_BYTES = 256 * 2**20

# Sources that cannot change numbers (the CLIs, the report's formatting, tools).
_CODE_EXCLUDED = ("main.py", "compare.py", "benchmark.py", "fingerprint.py", "workdir.py",
                  os.path.join("evaluation", "report.py"), "tools")


def settings(cfg: ConfigDict) -> dict[str, Any]:
  """{dotted key: value} of the resolved config, minus `IGNORED_KEYS`; tuples become lists."""
  flat: dict[str, Any] = {}

  def walk(node: Mapping, prefix: str) -> None:
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, Mapping):
        walk(value, name + ".")
      elif name not in IGNORED_KEYS:
        flat[name] = value

  walk(cfg.copy_and_resolve_references().to_dict(), "")
  return json.loads(json.dumps(flat, sort_keys=True))


def model_digest(folder: str) -> str:
  """sha256 over the model folder's files (weights, config.json, conditions, orbax params)."""
  h = hashlib.sha256()
  folder = os.path.abspath(folder)
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      stat = os.stat(path)
      h.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0".encode())
      if stat.st_size <= FULL_HASH_MAX_BYTES:
        with open(path, "rb") as f:
          for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
      else:
        h.update(str(stat.st_mtime_ns).encode())
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """sha256 of the Python sources that compute results (s2q_jax, conversion, pallas_kernels)."""
  h = hashlib.sha256()
  top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for package in ("s2q_jax", "conversion", "pallas_kernels"):
    base = os.path.join(top, package)
    for root, dirs, files in os.walk(base):
      dirs[:] = sorted(d for d in dirs if os.path.relpath(os.path.join(root, d), base)
                       not in _CODE_EXCLUDED and not d.startswith((".", "__")))
      for name in sorted(files):
        rel = os.path.relpath(os.path.join(root, name), base)
        if name.endswith(".py") and not (package == "s2q_jax" and rel in _CODE_EXCLUDED):
          h.update(f"{package}/{rel}\0".encode())
          with open(os.path.join(root, name), "rb") as f:
            h.update(f.read())
  return h.hexdigest()[:16]


def of_run(cfg: ConfigDict, model_folder: str) -> dict[str, Any]:
  """What determines a main-job run: its settings, the model files and the code."""
  return {**settings(cfg), "model files": model_digest(model_folder), "code": code_version()}


def describe(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 3) -> str:
  """'quant.w_bits=4 (now 5), ...': the entries that differ, at most `limit` named."""
  diffs = []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "<unset>") != new.get(key, "<unset>"):
      if key in ("model files", "code"):
        diffs.append(f"other {key} ({'s2q-jax sources changed' if key == 'code' else 'digest'} "
                     f"{old.get(key)} → {new.get(key)})")
      else:
        diffs.append(f"{key}={_show(old.get(key, '<unset>'))} (now {_show(new.get(key, '<unset>'))})")
  more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return ", ".join(diffs[:limit]) + more


def _show(value: Any) -> str:
  return value if isinstance(value, str) else json.dumps(value)
