"""Writes a Flax model as a diffusers folder that `from_pretrained` loads.

  python -m conversion.flax_to_diffusers --src CONVERTED_DIR --dst DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

from conversion.checkpoint_files import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from conversion.output_dir import atomic_output_dir

DIFFUSERS_VERSION = "0.42.1"  # the version the export format was checked against


def diffusers_state_dict(model, dtype: str | None = None) -> dict[str, np.ndarray]:
  """{diffusers key: array in PyTorch layout} of a Flax model, optionally cast."""
  # pylint: disable=import-outside-toplevel
  from s2q_jax.models.loading import architecture
  from s2q_jax.models.params import flat_params
  arch = architecture(model.config)
  out = {}
  for path, value in flat_params(model).items():
    if dtype is not None:
      value = value.astype(dtype)
    shape = arch.torch_shape(path, tuple(value.shape), model.config)
    out[arch.torch_key(path)] = np.ascontiguousarray(arch.to_torch(path, np.asarray(value), shape))
  return out


def save_diffusers(model, folder: str, dtype: str | None = None) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors into `folder` (dtype: as is)."""
  os.makedirs(folder, exist_ok=True)
  config = {**model.config.to_dict(), "_diffusers_version": DIFFUSERS_VERSION}
  with open(os.path.join(folder, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2)
  save_file(diffusers_state_dict(model, dtype), os.path.join(folder, WEIGHTS_NAME))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="converted checkpoint or diffusers folder")
  parser.add_argument("--dst", required=True, help="output diffusers folder (must not exist)")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  from s2q_jax.models.loading import load_pretrained  # pylint: disable=import-outside-toplevel
  try:
    with atomic_output_dir(args.dst, overwrite=args.overwrite) as tmp:
      save_diffusers(load_pretrained(args.src), tmp)
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
