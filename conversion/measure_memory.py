"""Measures the peak memory of a conversion on a large random checkpoint.

  python -m conversion.measure_memory [--preset cogvideox-2b] [--workdir DIR]

Writes a random diffusers-format checkpoint of the preset's size (sharded
safetensors, bf16, no torch needed), converts it to a bf16 Flax checkpoint in
a child process and prints the child's peak resident memory next to the
model's size, so the "about one copy of the model" claim can be checked.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from conversion import keymap
from conversion.checkpoint_files import WEIGHTS_INDEX_NAME

PRESETS = {
    "cogvideox-2b": dict(num_attention_heads=30, attention_head_dim=64, num_layers=30),
    "cogvideox-5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42,
                         use_rotary_positional_embeddings=True),
    "small": dict(num_attention_heads=8, attention_head_dim=64, num_layers=4),
}
SHARD_BYTES = 1 << 30


def write_random_checkpoint(folder: str, config: dict) -> int:
  """Writes a sharded random checkpoint; returns its size in bytes."""
  from s2q_jax.models.config import CogVideoXConfig  # pylint: disable=import-outside-toplevel
  from s2q_jax.models.loading import _torch_shape, abstract_model  # pylint: disable=import-outside-toplevel
  from s2q_jax.models.params import param_shapes  # pylint: disable=import-outside-toplevel
  cfg = CogVideoXConfig.from_dict(config)
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  shard, shard_bytes, weight_map, total, n = {}, 0, {}, 0, 0

  def flush():
    nonlocal shard, shard_bytes, n
    name = f"diffusion_pytorch_model-{n:05d}.safetensors"
    save_file(shard, os.path.join(folder, name))
    weight_map.update({k: name for k in shard})
    shard, shard_bytes, n = {}, 0, n + 1

  for path, (shape, _) in param_shapes(abstract_model(cfg)).items():
    tensor = (rng.standard_normal(_torch_shape(path, shape, cfg), np.float32) * 0.02
              ).astype(ml_dtypes.bfloat16)
    shard[keymap.torch_key(path)] = tensor
    shard_bytes += tensor.nbytes
    total += tensor.nbytes
    if shard_bytes >= SHARD_BYTES:
      flush()
  if shard:
    flush()
  with open(os.path.join(folder, WEIGHTS_INDEX_NAME), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
  parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
  args = parser.parse_args(argv)
  work = args.workdir or tempfile.mkdtemp(prefix="s2q-convert-mem-")
  src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
  size = write_random_checkpoint(src, PRESETS[args.preset])
  print(f"random {args.preset} checkpoint: {size / 2**30:.2f} GiB (bf16) in {src}")
  start = time.perf_counter()
  child = subprocess.Popen([sys.executable, "-m", "conversion.diffusers_to_flax", "--src", src,
                            "--dst", dst, "--dtype", "bfloat16", "--overwrite"])
  peak_anon = 0
  while child.poll() is None:
    peak_anon = max(peak_anon, _anon_bytes(child.pid))
    time.sleep(0.05)
  if child.returncode:
    return child.returncode
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
  print(f"conversion took {time.perf_counter() - start:.0f}s")
  print(f"peak RSS            {peak / 2**30:6.2f} GiB = {peak / size:.2f}x the bf16 model")
  print(f"peak anonymous RSS  {peak_anon / 2**30:6.2f} GiB = {peak_anon / size:.2f}x "
        "(excludes the memory-mapped input, which the kernel can drop)")
  return 0


def _anon_bytes(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
