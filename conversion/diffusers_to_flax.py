"""Converts a diffusers transformer folder into a Flax (orbax) checkpoint.

  python -m conversion.diffusers_to_flax --src DIR --dst DIR [--dtype bfloat16]

Tensors are read and converted one at a time from memory-mapped safetensors
files, so peak memory is about one copy of the model in the target dtype.
torch is not needed (except to read pickle checkpoints with --allow-pickle).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp

from conversion.checkpoint_files import CheckpointError
from conversion.output_dir import atomic_output_dir

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def convert(src: str, dst: str, *, dtype: str = "bfloat16", allow_pickle: bool = False,
            overwrite: bool = False) -> None:
  # Imported here so `--help` answers without initialising JAX.
  from s2q_jax.models import loading  # pylint: disable=import-outside-toplevel
  with atomic_output_dir(dst, overwrite=overwrite) as tmp:
    if loading.is_converted(src):
      model = loading.load_pretrained(src, DTYPES[dtype])
      loading.save_model(model, tmp)
      return
    config = loading.read_config(src)
    params = loading.DiffusersParams(src, config, DTYPES[dtype], allow_pickle=allow_pickle)
    loading.save_converted(config, params, tmp)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="diffusers transformer folder")
  parser.add_argument("--dst", required=True, help="output folder (must not exist)")
  parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
  parser.add_argument("--allow-pickle", action="store_true",
                      help="also read .bin/.pt pickle checkpoints (needs torch; trusted files only)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    convert(args.src, args.dst, dtype=args.dtype, allow_pickle=args.allow_pickle,
            overwrite=args.overwrite)
  except (CheckpointError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst} ({args.dtype}) in {time.perf_counter() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
