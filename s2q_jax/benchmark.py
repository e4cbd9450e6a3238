"""Times a full transformer forward, bf16 vs W4A6 on the kernels, and reports weight memory.

  python -m s2q_jax.benchmark [--preset cogvideox-2b|cogvideox-5b|small] [--backend auto]

Random weights at the preset's size; one forward (batch 1, no guidance) on
the preset's latent video. Defaults to `small` on CPU.
"""
from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.benchmark import time_fn
from s2q_jax import deploy, quant
from s2q_jax.job_config import base_config
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D, load_pretrained

PRESETS = {
    # CogVideoX at 49 frames 480×720: 13 latent frames of 60×90 → 17,550 video tokens + 226 text.
    "cogvideox-2b": (dict(num_attention_heads=30, num_layers=30), (13, 60, 90)),
    "cogvideox-5b": (dict(num_attention_heads=48, num_layers=42,
                          use_rotary_positional_embeddings=True), (13, 60, 90)),
    "small": (dict(num_attention_heads=4, num_layers=2, sample_height=16, sample_width=16),
              (2, 16, 16)),
}


def _weight_bytes(model) -> int:
  leaves = jax.tree.leaves(nnx.state(model))
  return sum(x.size * x.dtype.itemsize for x in leaves if hasattr(x, "dtype"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)
  preset = args.preset or ("small" if jax.default_backend() == "cpu" else "cogvideox-2b")
  overrides, (f, h, w) = PRESETS[preset]
  cfg = CogVideoXConfig(**overrides)
  model = CogVideoXTransformer3D(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, f, cfg.in_channels, h, w)), jnp.bfloat16)
  text = jnp.asarray(rng.standard_normal((1, cfg.max_text_seq_length, cfg.text_embed_dim)),
                     jnp.bfloat16)
  t = jnp.array([500])

  def forward(m):
    graphdef, state = nnx.split(m)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)), state

  fn, state = forward(model)
  bf16_time, bf16_bytes = time_fn(fn, state, x, text, t, reps=args.reps), _weight_bytes(model)

  quant.quantize_model(model, quant.rules_from_config(base_config(4, 6, "rtn").quant))
  quant.freeze_all(model)
  with tempfile.TemporaryDirectory() as tmp:
    deploy.export_quantized(model, tmp)
    del model
    deployed = load_pretrained(tmp, dtype=jnp.bfloat16, backend=args.backend)
  fn, state = forward(deployed)
  q_time, q_bytes = time_fn(fn, state, x, text, t, reps=args.reps), _weight_bytes(deployed)

  tokens = f * (h // cfg.patch_size) * (w // cfg.patch_size) + cfg.max_text_seq_length
  print(f"{preset}: {cfg.num_layers} layers, hidden {cfg.inner_dim}, {tokens} tokens; "
        f"device {jax.devices()[0].device_kind}, W4A6 back-end {args.backend}")
  print(f"{'':>6} | {'forward (s)':>11} | {'weights (GiB)':>13}")
  print(f"{'bf16':>6} | {bf16_time:11.3f} | {bf16_bytes / 2**30:13.3f}")
  print(f"{'W4A6':>6} | {q_time:11.3f} | {q_bytes / 2**30:13.3f}")
  print(f"speed-up {bf16_time / q_time:.2f}×, weight memory {bf16_bytes / q_bytes:.2f}× smaller")


if __name__ == "__main__":
  main()
