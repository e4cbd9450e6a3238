"""S²Q calibration at a real model's width and sequence length: time and peak memory per block.

  python -m s2q_jax.benchmark --calibration --preset cogvideox-2b --blocks 1
  python -m s2q_jax.benchmark --calibration --preset cogvideox-2b --tokens 1576 --samples 2 \\
      --epochs 3   # a quick check on a CPU

Random weights at the preset's size, in float32 as the main job calibrates,
and `--samples` random model inputs of `--tokens` tokens (default: the
preset's 13 latent frames of 60×90, 17,550 video + 226 text tokens). The
main job's S²Q block loop calibrates `--blocks` blocks with its default
settings (token importance, SmoothQuant start, learned clipping, smoothing
and Kronecker transform, GPTQ), `--epochs` epochs, every sample in one
batch sharded over all devices. Per block it reports the training time
per sample-epoch (epochs after the first, which also compiles), the
block's other work (targets, token weights, GPTQ, checkpoint) and the
peak host and device memory.
"""
from __future__ import annotations

import math
import tempfile

import jax
import numpy as np
from flax import nnx

from s2q_jax import quant
from s2q_jax.calibration.pool import Pool
from s2q_jax.job_config import base_config
from s2q_jax.methods import s2q
from s2q_jax.methods.blockwise import calibrate_blocks
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D


def latent_shape(cfg: CogVideoXConfig, video: tuple[int, int, int], tokens: int | None
                 ) -> tuple[int, int, int]:
  """(frames, height, width) of a latent with about `tokens` tokens (text included).

  Fewer tokens than the preset's video drop frames first, then rows of patches
  (the width stays the preset's).
  """
  frames, height, width = video
  if tokens is None:
    return video
  p = cfg.patch_size
  per_frame = (height // p) * (width // p)
  video_tokens = tokens - cfg.max_text_seq_length
  if video_tokens < width // p:
    raise ValueError(f"--tokens {tokens}: at least {cfg.max_text_seq_length + width // p} "
                     f"(the {cfg.max_text_seq_length} text tokens and one row of patches)")
  frames = min(frames, math.ceil(video_tokens / per_frame))
  rows = max(1, min(height // p, round(video_tokens / frames / (width // p))))
  return frames, rows * p, width


def random_inputs(cfg: CogVideoXConfig, latent: tuple[int, int, int], samples: int) -> Pool:
  """`samples` model inputs: random latents and text embeddings, timesteps across the range."""
  rng = np.random.default_rng(0)
  f, h, w = latent
  latents = rng.standard_normal((samples, f, cfg.in_channels, h, w), np.float32)
  text = rng.standard_normal((samples, cfg.max_text_seq_length, cfg.text_embed_dim), np.float32)
  timesteps = np.linspace(999, 0, samples).astype(np.int32)
  return Pool(latents=latents, previous=latents, timesteps=timesteps,
              steps=np.arange(samples), x0_change=np.zeros(samples), conditions=text,
              null_condition=np.zeros_like(text[0]), guidance_scale=1.0)  # no null twins


def run(overrides: dict, video: tuple[int, int, int], *, blocks: int, tokens: int | None,
        samples: int, epochs: int, log=print) -> dict:
  cfg = CogVideoXConfig(**{**overrides, "num_layers": blocks})
  if samples % jax.device_count():
    raise ValueError(f"--samples {samples} must be a multiple of the {jax.device_count()} "
                     "devices they are sharded over")
  latent = latent_shape(cfg, video, tokens)
  data = random_inputs(cfg, latent, samples)
  fp_model = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0))
  q_model = nnx.clone(fp_model)
  job = base_config(4, 6, "s2q")
  job.distill.epochs, job.distill.batch_size = epochs, samples
  quant.quantize_model(q_model, quant.rules_from_config(job.quant, q_model.quant_defaults()))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  with tempfile.TemporaryDirectory() as workdir:
    stats = calibrate_blocks(q_model, fp_model, data, s2q.recipe(job), workdir, mesh, log=log)
  f, h, w = latent
  n_tokens = f * (h // cfg.patch_size) * (w // cfg.patch_size) + cfg.max_text_seq_length
  result = {"hidden": cfg.inner_dim, "heads": cfg.num_attention_heads, "tokens": n_tokens,
            "latent": list(latent), "samples": samples, "epochs": epochs,
            "devices": jax.device_count(), "blocks": []}
  for b in stats["blocks"]:
    epoch_seconds = b["epoch_seconds"]
    warm = epoch_seconds[1:] or epoch_seconds  # the first epoch also compiles
    result["blocks"].append({
        "block": b["block"], "seconds": b["seconds"],
        "seconds_per_sample_epoch": float(np.median(warm)) / samples,
        "first_epoch_seconds": epoch_seconds[0],
        "other_seconds": b["seconds"] - sum(epoch_seconds),
        "peak_host_gib": b["peak_rss_gib"], "peak_device_gib": b["peak_device_gib"]})
  return result
