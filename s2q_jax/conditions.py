"""Stored conditions ("prompts") of a model: text-encoder outputs saved beside its weights.

The embedded model is class-conditional: class i's prompt is a fixed
embedding sequence, and the last row is the null condition used for
classifier-free guidance. A real CogVideoX folder has no such file, because
its prompts come from a T5 encoder that this package does not run.
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from conversion.checkpoint_files import CheckpointError

CONDITIONS_NAME = "conditions.safetensors"


def save_conditions(folder: str, embeddings: np.ndarray, names: list[str]) -> None:
  """Writes (num_prompts + 1, L, D) embeddings (last row: null prompt) and prompt names."""
  if embeddings.shape[0] != len(names) + 1:
    raise ValueError(f"{embeddings.shape[0]} embeddings for {len(names)} names: "
                     "expected one per name plus the null condition")
  save_file({"embeddings": np.ascontiguousarray(embeddings, np.float32)},
            os.path.join(folder, CONDITIONS_NAME), metadata={"names": json.dumps(names)})


def has_conditions(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, CONDITIONS_NAME))


def load_conditions(folder: str) -> tuple[np.ndarray, list[str]]:
  """(embeddings (num_prompts + 1, L, D), names) from a model folder."""
  path = os.path.join(folder, CONDITIONS_NAME)
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(path, framework="numpy") as f:
      names = json.loads((f.metadata() or {}).get("names", "[]"))
    table = load_file(path)["embeddings"]
  except (SafetensorError, OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path} is not a readable conditions file (corrupt or truncated?): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  if table.ndim != 3 or len(table) != len(names) + 1:
    raise CheckpointError(f"{path} holds {table.shape[0] if table.ndim else 0} embeddings for "
                          f"{len(names)} names: expected one per name plus the null condition")
  if not np.all(np.isfinite(table)):
    raise CheckpointError(f"{path} has NaN or Inf values in its embeddings")
  return table, names
