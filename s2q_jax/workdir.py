"""The job's workdir: checked writable early, created late, and never shared by two settings.

The workdir holds resumable state (the calibration checkpoint, the pool) that
is only valid for the settings that made it, so it carries a
`fingerprint.json`; a run with other settings stops instead of mixing them.
"""
from __future__ import annotations

import json
import os
from typing import Any

from s2q_jax import fingerprint
from s2q_jax.errors import UserError
from s2q_jax.outputs import write_json

FINGERPRINT_NAME = "fingerprint.json"
# What a run leaves that a later run could trust or be mistaken for (videos/ alone
# is not: a run that failed early may have left it empty).
_ARTEFACTS = ("calibration", "pool.npz", "report.json", "quantized_model")


def probe_writable(path: str) -> str:
  """The absolute workdir path, after checking it can be written; leaves nothing it created.

  Runs before the model loads, so a bad --config.workdir fails fast, and removes
  the folders it made, so a bad model leaves no empty workdir behind.
  """
  path = os.path.abspath(path)
  created, parent = [], path
  while not os.path.exists(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  probe = os.path.join(path, f".write-test-{os.getpid()}")
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to workdir {path} ({e.strerror}): "
                    "choose another with --config.workdir") from None
  finally:
    for folder in created:  # deepest first
      try:
        os.rmdir(folder)
      except OSError:
        break
  return path


def open_workdir(path: str, current: dict[str, Any]) -> str:
  """Creates the workdir for a run with fingerprint `current`, or stops if it holds another run."""
  stored_path = os.path.join(path, FINGERPRINT_NAME)
  if os.path.exists(stored_path):
    try:
      with open(stored_path) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      stored = None
    if stored is None:
      raise UserError(f"workdir {path} has an unreadable {FINGERPRINT_NAME}: use another "
                      f"--config.workdir or delete {path}")
    if stored != current:
      raise UserError(f"workdir {path} holds a run with {fingerprint.describe(stored, current)}: "
                      f"use another --config.workdir or delete {path}")
    return path
  if any(os.path.exists(os.path.join(path, name)) for name in _ARTEFACTS):
    raise UserError(f"workdir {path} holds a run without a fingerprint (made by an older "
                    f"s2q-jax), so its settings are unknown: use another --config.workdir or "
                    f"delete {path}")
  write_json(stored_path, current)
  return path


def stored_fingerprint(path: str) -> dict[str, Any] | None:
  """The fingerprint a workdir was made with, or None (absent or unreadable)."""
  try:
    with open(os.path.join(path, FINGERPRINT_NAME)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
