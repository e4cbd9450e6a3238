"""QVD: high-temporal-discriminability quantization (HTDQ) and scattered channel range
integration (SCRI), as formulated here for dynamic per-token activation quantization.

QVD (Tian et al., 2024) was written for static activation quantizers; this
package quantizes activations per token at run time, so both ideas are
recast as per-channel transforms that fold into the deployed layer
(`QuantLinear`'s shift z and smoothing s; z W goes into the bias):

* SCRI, on every layer that reads tokens: a channel whose range [lo_j, hi_j]
  over the calibration samples is skewed (far from centred on 0) wastes
  codes on one side, and channels of very different width make the
  per-token scale follow the widest. Each channel is shifted to its mean
  over all calibration tokens, z_j = mean x_j (QVD centres the [min, max]
  range, but under per-token scales a centre set by one rare outlier would
  move every token: measured, it cost 3 dB against RTN here), and its
  half-width h_j = max |x_j - z_j| is pulled toward the median:
  s_j = (h_j / median h)^β, β = `qvd.scri_beta`.
* HTDQ, on the layers that read the temporal features (the adaLN
  modulations' silu(temb) input, one vector per sample): the quantized
  embeddings of different timesteps must stay apart. For each such layer
  the shift z is chosen, among {0, channel mean, channel centre}, to
  maximise the smallest distance between the quantized features of distinct
  calibration timesteps relative to their full-precision distance.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.calibration.capture import recorded_batches
from s2q_jax.calibration.pool import Pool
from s2q_jax.methods.calibration_data import calibration_data, uniform_positions
from s2q_jax.quant import quantizer
from s2q_jax.quant.apply import quantized_layers
from s2q_jax.quant.qlinear import ChannelShift, SmoothScale


def _collect(fp_model: nnx.Module, paths: set[str], data: Pool):
  """Per layer: channel min, max, mean, and (for 2-D inputs) the inputs with their timesteps."""
  lo, hi, total, count, vectors = {}, {}, {}, {}, {}
  for sl, inputs in recorded_batches(fp_model, paths, data):
    for path, xs in inputs.items():
      for x in xs:
        x = np.asarray(x, np.float32)
        flat = x.reshape(-1, x.shape[-1])
        lo[path] = np.minimum(lo.get(path, np.inf), flat.min(0))
        hi[path] = np.maximum(hi.get(path, -np.inf), flat.max(0))
        total[path] = total.get(path, 0.0) + flat.astype(np.float64).sum(0)
        count[path] = count.get(path, 0) + len(flat)
        if x.ndim == 2:  # one vector per sample: temporal features
          vectors.setdefault(path, []).append((x, data.timesteps[sl]))
  mean = {p: (total[p] / count[p]).astype(np.float32) for p in total}
  return lo, hi, mean, vectors


def scri_transform(lo: np.ndarray, hi: np.ndarray, mean: np.ndarray,
                   beta: float) -> tuple[np.ndarray, np.ndarray]:
  """(shift z, scale s) integrating each channel's range into a common one around its mean."""
  centre = mean
  half = np.maximum(np.maximum(hi - centre, centre - lo), 1e-6)
  scale = np.clip((half / np.median(half)) ** beta, 1e-2, 1e2)
  return centre.astype(np.float32), scale.astype(np.float32)


def temporal_discriminability(x: np.ndarray, timesteps: np.ndarray, shift: np.ndarray,
                              bits: int) -> float:
  """min over timestep pairs of ‖Q(x_a - z) - Q(x_b - z)‖ / ‖x_a - x_b‖, one vector per step."""
  _, first = np.unique(timesteps, return_index=True)
  x = x[first]
  xq = np.asarray(quantizer.fake_quant_activations(jnp.asarray(x - shift), bits))
  d_fp = np.linalg.norm(x[:, None] - x[None], axis=-1)
  d_q = np.linalg.norm(xq[:, None] - xq[None], axis=-1)
  pairs = ~np.eye(len(x), dtype=bool) & (d_fp > 0)
  return float(np.min(d_q[pairs] / d_fp[pairs])) if pairs.any() else 1.0


def htdq_shift(x: np.ndarray, timesteps: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               bits: int) -> tuple[str, np.ndarray, float]:
  candidates = {"none": np.zeros_like(lo), "mean": x.mean(0), "centre": (lo + hi) / 2}
  scored = {name: temporal_discriminability(x, timesteps, z.astype(np.float32), bits)
            for name, z in candidates.items()}
  best = max(scored, key=scored.get)
  return best, candidates[best].astype(np.float32), scored[best]


def calibrate(q_model: nnx.Module, fp_model: nnx.Module, pool: Pool, cfg, workdir: str,
              mesh: jax.sharding.Mesh, log=print) -> dict[str, Any]:
  del workdir, mesh  # nothing is trained
  data, selection = calibration_data(pool, uniform_positions(pool, cfg), cfg)
  layers = [(p, l) for p, l in quantized_layers(q_model) if l.a_bits is not None]
  log(f"  channel ranges of {len(layers)} layers over {len(data)} samples")
  lo, hi, mean, vectors = _collect(fp_model, {p for p, _ in layers}, data)
  htdq = {}
  for path, layer in layers:
    if path in vectors:
      x = np.concatenate([v for v, _ in vectors[path]])
      t = np.concatenate([s for _, s in vectors[path]])
      choice, shift, score = htdq_shift(x, t, lo[path], hi[path], layer.a_bits)
      layer.shift = ChannelShift(jnp.asarray(shift))
      htdq[path] = {"shift": choice, "discriminability": score}
    else:
      shift, scale = scri_transform(lo[path], hi[path], mean[path], cfg.qvd.scri_beta)
      layer.shift = ChannelShift(jnp.asarray(shift))
      layer.smooth = SmoothScale(jnp.asarray(scale))
  log(f"  HTDQ on {len(htdq)} temporal layers, SCRI on {len(layers) - len(htdq)}")
  return {"num_candidates": len(pool), "selection": selection, "htdq": htdq}
