"""Quality of quantized videos against the full-precision videos made from the same noise.

Videos are (B, F, C, H, W) arrays with values in [-1, 1]; every metric is
computed per video and returned as a (B,) array.
"""
from __future__ import annotations

import numpy as np

DATA_RANGE = 2.0  # values lie in [-1, 1]


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
  """Peak signal-to-noise ratio in dB over each whole video (inf when identical)."""
  mse = np.mean(np.square(_clip(reference) - _clip(test)), axis=(1, 2, 3, 4))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(DATA_RANGE**2 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  return g / g.sum()


def _filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering over the last two axes."""
  size = len(window)
  rows = sum(w * img[..., i:img.shape[-2] - size + 1 + i, :] for i, w in enumerate(window))
  return sum(w * rows[..., :, i:rows.shape[-1] - size + 1 + i] for i, w in enumerate(window))


def ssim(reference: np.ndarray, test: np.ndarray, *, window_size: int = 7) -> np.ndarray:
  """Mean structural similarity (Wang et al. 2004) over frames and channels of each video.

  Gaussian window σ = 1.5 (7×7, small because the embedded model's frames
  are 32×32), K1 = 0.01, K2 = 0.03, valid windows only.
  """
  x, y = _clip(reference).astype(np.float64), _clip(test).astype(np.float64)
  win = _gaussian_window(window_size)
  c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
  mx, my = _filter(x, win), _filter(y, win)
  sxx = _filter(x * x, win) - mx * mx
  syy = _filter(y * y, win) - my * my
  sxy = _filter(x * y, win) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
  return s.mean(axis=(1, 2, 3, 4))


def temporal_consistency(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
  """Agreement of motion: mean over frame pairs of cos(Δ_ref, Δ_test), Δ_f = x_{f+1} − x_f.

  1 means the quantized video changes from frame to frame exactly as the
  full-precision one does (up to a positive factor); 0 means unrelated
  motion (also when only one of the two is static); pairs where both are
  static count as 1.
  """
  b, f = reference.shape[:2]
  d_ref = np.diff(_clip(reference), axis=1).reshape(b, f - 1, -1)
  d_test = np.diff(_clip(test), axis=1).reshape(b, f - 1, -1)
  dot = np.sum(d_ref * d_test, axis=-1)
  n_ref, n_test = np.linalg.norm(d_ref, axis=-1), np.linalg.norm(d_test, axis=-1)
  both_static = (n_ref == 0) & (n_test == 0)
  cos = np.where(both_static, 1.0, dot / np.maximum(n_ref * n_test, 1e-30))
  return cos.mean(axis=1)


def _clip(v: np.ndarray) -> np.ndarray:
  return np.clip(np.asarray(v, np.float64), -1.0, 1.0)


def per_video(reference: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
  """{metric: (B,) scores}: PSNR, SSIM and temporal consistency of each video."""
  return {"psnr": psnr(reference, test), "ssim": ssim(reference, test),
          "temporal_consistency": temporal_consistency(reference, test)}


def summarize(reference: np.ndarray, test: np.ndarray) -> dict[str, float]:
  """Metrics averaged over videos (PSNR of identical videos is reported as inf)."""
  return means(per_video(reference, test))


def means(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """{metric: mean over videos} of `per_video`'s scores."""
  return {k: float(np.mean(v)) for k, v in scores.items()}


def mean_and_standard_error(x) -> tuple[float, float]:
  """Mean of `x` and its standard error (0 for a single value)."""
  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def standard_errors(scores: dict[str, np.ndarray]) -> dict[str, float | None]:
  """{metric: standard error of its mean over videos}; None below two videos or with an
  infinite score (an identical video), where the spread has no finite value.

  One video's PSNR moves by several dB with its noise, so a mean over a few
  videos is uncertain by more than the gaps between good methods: reported
  beside every mean so nobody ranks runs inside it.
  """
  return {k: mean_and_standard_error(v)[1] if len(v) > 1 and np.all(np.isfinite(v)) else None
          for k, v in scores.items()}
