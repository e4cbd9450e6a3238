"""Full-transformer benchmark at a real model's size: W4A6 storage, and forward time bf16 vs W4A6.

  python -m s2q_jax.benchmark --preset cogvideox-2b --storage-only --json F   # no accelerator
  python -m s2q_jax.benchmark --preset cogvideox-5b --backends xla_int8,gpu,auto --unfused --json F
  python -m s2q_jax.benchmark --calibration --preset cogvideox-2b --blocks 1 --json F

`--calibration` times S²Q calibration instead (see `s2q_jax.calibration_benchmark`).

Random weights at the preset's size, quantized with the main job's default
layer rules at W4A6 (`job_config.base_config(4, 6, "rtn")`), exported as the
job exports them. Each back-end is timed with the activation quantization
fused into the norm + modulation (`s2q_jax.fused_quant`, as
`s2q_jax.pretrained.load_pretrained` deploys) and, with `--unfused`, also
without ("w4a6 <backend> unfused"). Storage is measured from files, headers
included, as the job reports it: the model saved as a bf16 diffusers safetensors file against
the quantized checkpoint's weights file. Timing (skipped by --storage-only):
one forward (batch 1, no guidance) on the preset's latent video, bf16 and
deployed W4A6 in bf16 on each back-end; warm-up, then `--reps` calls with one
sync. Defaults to the `small` preset on CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.flax_to_diffusers import save_diffusers
from pallas_kernels.benchmark import environment as kernel_environment
from pallas_kernels.timing import loop_time
from s2q_jax import deploy, quant
from s2q_jax.job_config import base_config
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D
from s2q_jax.pretrained import load_pretrained

PRESETS = {
    # CogVideoX at 49 frames 480×720: 13 latent frames of 60×90 → 17,550 video tokens + 226 text.
    "cogvideox-2b": (dict(num_attention_heads=30, num_layers=30), (13, 60, 90)),
    "cogvideox-5b": (dict(num_attention_heads=48, num_layers=42,
                          use_rotary_positional_embeddings=True), (13, 60, 90)),
    "small": (dict(num_attention_heads=4, num_layers=2, sample_height=16, sample_width=16),
              (2, 16, 16)),
}


def environment() -> dict:
  """`pallas_kernels.benchmark.environment` plus the model-side libraries."""
  import flax  # pylint: disable=import-outside-toplevel
  import safetensors  # pylint: disable=import-outside-toplevel
  env = kernel_environment()
  env["versions"].update(flax=flax.__version__, safetensors=safetensors.__version__)
  return env


def quantize_w4a6(model: nnx.Module) -> None:
  """The main job's default W4A6 layer rules, round to nearest, frozen for export."""
  quant.quantize_model(model, quant.rules_from_config(base_config(4, 6, "rtn").quant,
                                                       model.quant_defaults()))
  quant.freeze_all(model)


def storage(model: nnx.Module, folder: str) -> dict:
  """Quantizes `model` in place; bytes of its bf16 and W4A6 weight files, written to `folder`."""
  fp_dir, q_dir = os.path.join(folder, "bf16"), os.path.join(folder, "w4a6")
  save_diffusers(model, fp_dir, dtype="bfloat16")
  fp_bytes = sum(os.path.getsize(os.path.join(fp_dir, f)) for f in os.listdir(fp_dir)
                 if f.endswith(".safetensors"))
  quantize_w4a6(model)
  deploy.export_quantized(model, q_dir)
  quant_bytes = deploy.weights_file_bytes(q_dir)
  return {"fp_bytes": fp_bytes, "quant_bytes": quant_bytes, "compression": fp_bytes / quant_bytes}


def time_forward(model: nnx.Module, args: tuple, reps: int) -> float:
  """Seconds per forward: one compile + warm-up call, then `reps` calls and a single sync."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))
  return loop_time(fn, state, *args, reps=reps, warmup=1)


def _inputs(cfg: CogVideoXConfig, video: tuple[int, int, int]) -> tuple:
  f, h, w = video
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, f, cfg.in_channels, h, w)), jnp.bfloat16)
  text = jnp.asarray(rng.standard_normal((1, cfg.max_text_seq_length, cfg.text_embed_dim)),
                     jnp.bfloat16)
  return x, text, jnp.array([500])


def run(preset: str, backends: list[str], reps: int, storage_only: bool,
        unfused: bool = False) -> dict:
  overrides, video = PRESETS[preset]
  cfg = CogVideoXConfig(**overrides)
  model = CogVideoXTransformer3D(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # bf16: half the RAM
  n_params = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  result = {"preset": preset, "params": int(n_params), "layers": cfg.num_layers,
            "hidden": cfg.inner_dim, **environment()}
  times = {}
  if not storage_only:
    args = _inputs(cfg, video)
    times["bf16"] = time_forward(model, args, reps)
  with tempfile.TemporaryDirectory() as tmp:
    result["storage"] = storage(model, tmp)
    del model
    gc.collect()
    if not storage_only:
      for backend in backends:
        for fuse in (True, False) if unfused else (True,):
          deployed = load_pretrained(os.path.join(tmp, "w4a6"), dtype=jnp.bfloat16,
                                     backend=backend, fuse_act_quant=fuse)
          times[f"w4a6 {backend}" + ("" if fuse else " unfused")] = time_forward(
              deployed, args, reps)
          del deployed
  if times:
    f, h, w = video
    result["tokens"] = f * (h // cfg.patch_size) * (w // cfg.patch_size) + \
        cfg.max_text_seq_length
    result["forward_seconds"] = times
    result["speedup_vs_bf16"] = {k: times["bf16"] / v for k, v in times.items() if k != "bf16"}
  return result


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
  parser.add_argument("--backends", default="auto",
                      help="comma-separated W4A6 back-ends to time (see pallas_kernels.BACKENDS)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--unfused", action="store_true",
                      help="also time each back-end without fused activation quantization")
  parser.add_argument("--storage-only", action="store_true",
                      help="only export and measure file sizes (no accelerator needed)")
  parser.add_argument("--json", default=None, help="write the result to this file")
  calib = parser.add_argument_group("--calibration: time and memory of S²Q calibration")
  calib.add_argument("--calibration", action="store_true")
  calib.add_argument("--blocks", type=int, default=1, help="blocks to calibrate")
  calib.add_argument("--tokens", type=int, default=None,
                     help="tokens per sample, text included (default: the preset's video)")
  calib.add_argument("--samples", type=int, default=4, help="calibration inputs (one batch)")
  calib.add_argument("--epochs", type=int, default=3, help="epochs (the first also compiles)")
  args = parser.parse_args(argv)
  if args.calibration:
    return _calibration_main(args, argv)
  from pallas_kernels import BACKENDS  # pylint: disable=import-outside-toplevel
  backends = [b for b in args.backends.split(",") if b]
  if bad := [b for b in backends if b not in BACKENDS]:
    parser.error(f"unknown back-end(s) {', '.join(bad)}: choose from {', '.join(BACKENDS)}")
  preset = args.preset or ("small" if jax.default_backend() == "cpu" else "cogvideox-2b")
  result = {"command": "python -m s2q_jax.benchmark " + " ".join(argv or sys.argv[1:]),
            **run(preset, backends, args.reps, args.storage_only, args.unfused)}
  s = result["storage"]
  print(f"{preset}: {result['params'] / 1e9:.3f} B parameters, {result['layers']} layers, "
        f"hidden {result['hidden']}; {result['device']}")
  print(f"storage: bf16 {s['fp_bytes'] / 2**30:.3f} GiB, W4A6 {s['quant_bytes'] / 2**30:.3f} GiB, "
        f"{s['compression']:.2f}× smaller")
  for name, seconds in result.get("forward_seconds", {}).items():
    speedup = result["speedup_vs_bf16"].get(name)
    print(f"forward {name:>24}: {seconds:8.3f} s" + (f"  {speedup:.2f}× bf16" if speedup else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


def _calibration_main(args, argv) -> dict:
  from s2q_jax import calibration_benchmark  # pylint: disable=import-outside-toplevel
  preset = args.preset or ("small" if jax.default_backend() == "cpu" else "cogvideox-2b")
  overrides, video = PRESETS[preset]
  result = {"command": "python -m s2q_jax.benchmark " + " ".join(argv or sys.argv[1:]),
            "preset": preset, **environment(),
            **calibration_benchmark.run(overrides, video, blocks=args.blocks, tokens=args.tokens,
                                        samples=args.samples, epochs=args.epochs)}
  print(f"{preset} calibration: hidden {result['hidden']}, {result['tokens']} tokens, "
        f"{result['samples']} samples × {result['epochs']} epochs on {result['devices']} × "
        f"{result['device']}")
  for b in result["blocks"]:
    device = b["peak_device_gib"]
    print(f"block {b['block']}: {b['seconds_per_sample_epoch']:.2f} s per sample-epoch, first "
          f"epoch {b['first_epoch_seconds']:.1f} s, other work {b['other_seconds']:.1f} s, peak "
          f"host {b['peak_host_gib']:.2f} GiB" + (f", device {device:.2f} GiB" if device else ""))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
