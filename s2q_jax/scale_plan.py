"""Memory plan of the main job on CogVideoX-2B and 5B pipelines, computed from shapes alone.

  python -m s2q_jax.scale_plan            # the README's table (no weights needed)
  python -m s2q_jax.scale_plan --check    # the CPU calibration benchmarks against it
  python -m s2q_jax.scale_plan --time     # calibration compute: measured rate and floors

Rows, in GiB:
- weights in bf16: the transformer, the T5 v1.1 XXL encoder, the VAE decoder;
- one calibration sample at `tokens` tokens, float32 as the block loop holds
  it: the full-precision input and target and the quantized blocks' input
  (3 × tokens × hidden, on the host for the whole block loop), and the inputs
  of one block's quantized linears that GPTQ records (on the device while a
  block is frozen); × `calib.num_samples` for the whole calibration set;
- the candidate pool: `calib.num_prompts` × steps candidates, each x_t,
  x_{t−1} (float32 latents) and its condition (float32 T5 embedding);
- decoding one 49 × 480 × 720 video (`vae_memory`: largest activation, conv
  cache, output; bf16).
What the training step itself needs on the device (autodiff residuals, and on
CPU attention in tiles of at most 256 MiB of logits) is not a shape count: `--check` compares
the held arrays with the measured peaks in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os

import jax.numpy as jnp
from flax import nnx

from s2q_jax.benchmark import PRESETS
from s2q_jax.models import CogVideoXConfig, CogVideoXVAEConfig, T5Encoder, T5EncoderConfig
from s2q_jax.models.loading import abstract_model
from s2q_jax.models.params import param_shapes
from s2q_jax.models.vae_memory import decode_memory
from s2q_jax.quant.apply import iter_linears

GIB = 2.0**30
F32, BF16 = 4, 2
# google/t5-v1_1-xxl, the text encoder of both CogVideoX pipelines.
T5_XXL = T5EncoderConfig(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                         num_heads=64, feed_forward_proj="gated-gelu")
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "benchmarks", "results")


def _num_params(model: nnx.Module) -> int:
  return sum(math.prod(shape) for shape, _ in param_shapes(model).values())


def transformer_config(preset: str) -> tuple[CogVideoXConfig, tuple[int, int, int]]:
  overrides, latent = PRESETS[preset]
  return CogVideoXConfig(**overrides), latent


def tokens(cfg: CogVideoXConfig, latent: tuple[int, int, int]) -> int:
  f, h, w = latent
  return f * (h // cfg.patch_size) * (w // cfg.patch_size) + cfg.max_text_seq_length


def sample_bytes(cfg: CogVideoXConfig, n_tokens: int) -> tuple[int, int]:
  """(held, recorded): one calibration sample's float32 block arrays at `n_tokens` tokens.

  held: full-precision input, its target and the quantized input; recorded: the
  input of every quantized linear of one block (q, k, v, out, FF in at the
  hidden width, FF out at the FF width; the adaLN linears see one vector).
  """
  block = abstract_model(dataclasses.replace(cfg, num_layers=1)).transformer_blocks[0]
  recorded = 0
  for path, layer in iter_linears(block):
    rows = 1 if path.startswith("norm") else n_tokens
    recorded += rows * layer.kernel.shape[0]
  return 3 * n_tokens * cfg.inner_dim * F32, recorded * F32


def plan(preset: str, *, num_prompts: int = 8, num_steps: int = 50, num_samples: int = 40
         ) -> dict[str, float]:
  """{row: GiB} for a preset at its full video size (see the module docstring)."""
  cfg, latent = transformer_config(preset)
  n = tokens(cfg, latent)
  held, recorded = sample_bytes(cfg, n)
  f, h, w = latent
  latent_bytes = f * cfg.in_channels * h * w * F32
  condition_bytes = cfg.max_text_seq_length * cfg.text_embed_dim * F32
  candidates = num_prompts * num_steps
  vae = decode_memory(CogVideoXVAEConfig(), (1, cfg.in_channels, f, h, w), jnp.bfloat16)
  t5 = nnx.eval_shape(lambda: T5Encoder(T5_XXL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  return {
      "tokens": n,
      "transformer (bf16)": _num_params(abstract_model(cfg)) * BF16 / GIB,
      "T5-XXL encoder (bf16)": _num_params(t5) * BF16 / GIB,
      "VAE decoder (bf16)": vae.weights / GIB,
      "calibration sample, held (f32)": held / GIB,
      "calibration sample, GPTQ-recorded inputs (f32)": recorded / GIB,
      f"{num_samples} samples, held + recorded": num_samples * (held + recorded) / GIB,
      f"candidate pool ({num_prompts} prompts × {num_steps} steps)":
          candidates * (2 * latent_bytes + condition_bytes) / GIB,
      "VAE decode of one video (bf16: largest tensor + conv cache + output)":
          (vae.largest_activation + vae.conv_cache + vae.output) / GIB,
  }


def check() -> list[dict]:
  """Measured one-block calibration peaks against the held and recorded arrays at their size."""
  rows = []
  for path in sorted(glob.glob(os.path.join(RESULTS, "calibration_*.json"))):
    with open(path) as f:
      result = json.load(f)
    cfg, _ = transformer_config(result["preset"])
    held, recorded = sample_bytes(cfg, result["tokens"])
    s = result["samples"]
    block_weights = _num_params(abstract_model(dataclasses.replace(cfg, num_layers=1))
                                .transformer_blocks[0]) * F32
    rows.append({"file": os.path.basename(path), "tokens": result["tokens"], "samples": s,
                 "measured peak host": result["blocks"][0]["peak_host_gib"],
                 "held + recorded": s * (held + recorded) / GIB,
                 "attention map (one, f32)": s * cfg.num_attention_heads * result["tokens"] ** 2
                 * F32 / GIB,
                 "block weights (f32, one copy)": block_weights / GIB})
  return rows


# (hidden, blocks, video tokens + text tokens) at each model's standard video size:
# CogVideoX 49 × 480 × 720 (13 × 60 × 90 latents, 2 × 2 patches, 226 text tokens);
# HunyuanVideo-13B 129 × 720 × 1280 (33 × 90 × 160 latents, 1 × 2 × 2 patches, 20 dual- and
# 40 single-stream blocks, 256 text tokens).
COMPUTE_MODELS = {"CogVideoX-2B": (1920, 30, 13 * 30 * 45 + 226),
                  "CogVideoX-5B": (3072, 42, 13 * 30 * 45 + 226),
                  "HunyuanVideo-13B": (3072, 60, 33 * 45 * 80 + 256)}
# Dense bf16 matmul peaks (vendor figures), FLOP/s: the floors below divide by these.
PEAKS = {"one H100 SXM": 989e12, "v5e-8 slice": 8 * 197e12}


def block_train_flops(hidden: int, n_tokens: int) -> float:
  """FLOPs of one training step of one block on one sample: 3 × (linears + attention) forward.

  Per token the block's linears hold 12·d² weights (q, k, v, out: 4d²; the 4×
  MLP: 8d²; the same count for MMDiT dual- and single-stream blocks), and the
  scores and value product cost 4·T·d per token; the backward pass is about
  twice the forward. Quantizer extras (fake quantization, the Kronecker
  transform's two small matmuls) are below 2% at these widths and left out.
  """
  forward = 2 * n_tokens * 12 * hidden**2 + 4 * n_tokens**2 * hidden
  return 3.0 * forward


def compute_table(samples: int = 40, epochs: int = 15) -> tuple[list[dict], float]:
  """(rows, measured CPU FLOP/s): calibration's training-step compute per model, the CPU
  rate measured at full length applied to it, and floors at accelerator peaks.

  Only the training steps: targets, token weights, GPTQ and the pool come on top.
  """
  measured = os.path.join(RESULTS, "calibration_cogvideox-2b_17776tok_cpu_tiled_2026-12-06.json")
  with open(measured) as f:
    cpu = json.load(f)
  cpu_rate = block_train_flops(cpu["hidden"], cpu["tokens"]) / \
      cpu["blocks"][0]["seconds_per_sample_epoch"]
  rows = []
  for name, (hidden, blocks, n) in COMPUTE_MODELS.items():
    total = block_train_flops(hidden, n) * samples * epochs * blocks
    row = {"model": name, "tokens": n, "blocks": blocks,
           "TFLOP per block and sample-epoch": block_train_flops(hidden, n) / 1e12,
           f"PFLOP, {samples} samples × {epochs} epochs": total / 1e15,
           "2-core CPU at its measured rate (days)": total / cpu_rate / 86400}
    row.update({f"floor, {chip} (minutes)": total / peak / 60 for chip, peak in PEAKS.items()})
    rows.append(row)
  return rows, cpu_rate


def _print_rows(rows: list[dict]) -> None:
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(f"{r[k]:,.2f}" if isinstance(r.get(k), float) else
                            f"{r[k]:,}" if isinstance(r.get(k), int) else str(r.get(k, ""))
                            for k in keys) + " |")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help=check.__doc__)
  parser.add_argument("--time", action="store_true", help=compute_table.__doc__)
  args = parser.parse_args(argv)
  if args.time:
    rows, cpu_rate = compute_table()
    _print_rows(rows)
    print(f"\nmeasured: {cpu_rate / 1e9:.1f} GFLOP/s, one CogVideoX-2B block at 17,776 tokens "
          "on the 2-core CPU; floors: FLOPs / dense bf16 peak (no accelerator has run it)")
    return
  if args.check:
    rows = check()
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
      print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v)
                              for v in r.values()) + " |")
    return
  plans = {p: plan(p) for p in ("cogvideox-2b", "cogvideox-5b")}
  print("| GiB | CogVideoX-2B | CogVideoX-5B |\n|---|---|---|")
  for row in plans["cogvideox-2b"]:
    values = [plans[p][row] for p in plans]
    print(f"| {row} | " + " | ".join(f"{v:,}" if row == "tokens" else f"{v:.2f}"
                                     for v in values) + " |")


if __name__ == "__main__":
  main()
