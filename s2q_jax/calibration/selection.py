"""Choosing calibration samples from the candidate pool by salience (or baselines for ablation)."""
from __future__ import annotations

import numpy as np

METHODS = ("salient_stratified", "salient", "uniform", "random")
BAND_QUOTAS = ("equal", "salience")
BAND_LAYOUTS = ("contiguous", "spread")


def minmax_normalize(scores: np.ndarray) -> np.ndarray:
  """Scores mapped to [0, 1] over the pool; a constant pool maps to all ones.

  All ones (not zeros) so that a constant factor leaves the other factor of
  the product `salient_scores` in charge instead of zeroing every score.
  """
  scores = np.asarray(scores, np.float64)
  if scores.size == 0 or not np.all(np.isfinite(scores)):
    raise ValueError(f"salience scores must be finite and non-empty, got {scores}")
  lo, hi = scores.min(), scores.max()
  if hi == lo:
    return np.ones_like(scores)
  return (scores - lo) / (hi - lo)


def salient_scores(c_diff: np.ndarray, c_quant: np.ndarray) -> np.ndarray:
  """C = C̄_diff · C̄_quant, each min-max normalised over the pool."""
  return minmax_normalize(c_diff) * minmax_normalize(c_quant)


def select_indices(scores: np.ndarray | None, num_samples: int, method: str = "salient", *,
                   pool_size: int | None = None, seed: int = 0) -> np.ndarray:
  """Indices of the chosen candidates, in pool order.

  salient: the top `num_samples` scores; uniform: evenly spaced over the pool;
  random: a seeded draw without replacement. (`salient_stratified` needs the
  sampler steps: see `stratified_indices`.)
  """
  if method not in METHODS or method == "salient_stratified":
    raise ValueError(f"selection method {method!r}: choose one of "
                     f"{', '.join(m for m in METHODS if m != 'salient_stratified')}")
  n = len(scores) if scores is not None else pool_size
  if n is None:
    raise ValueError("pass scores or pool_size")
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
    raise ValueError(f"num_samples must be an integer, got {num_samples!r}")
  if not 1 <= num_samples <= n:
    raise ValueError(f"cannot select {num_samples} samples from a pool of {n}")
  if method == "salient":
    if scores is None:
      raise ValueError("salient selection needs scores")
    scores = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(scores)):
      raise ValueError("salient selection needs finite scores")
    # Stable sort: ties go to the earlier candidate, so the choice is reproducible.
    chosen = np.argsort(-scores, kind="stable")[:num_samples]
  elif method == "uniform":
    # Spacing (n − 1)/(num_samples − 1) ≥ 1, so the rounded indices are distinct.
    chosen = np.round(np.linspace(0, n - 1, num_samples)).astype(int)
  else:
    chosen = np.random.default_rng(seed).choice(n, num_samples, replace=False)
  return np.sort(chosen)


def band_quotas(band_sizes: np.ndarray, num_samples: int, weights: np.ndarray | None = None
                ) -> np.ndarray:
  """Samples per band: ∝ `weights` (default equal), whole numbers, at most each band's size.

  Largest-remainder rounding, so the quotas sum to `num_samples`; what a full band
  cannot take goes to the others in proportion to their weights.
  """
  sizes = np.asarray(band_sizes, np.int64)
  if num_samples > sizes.sum():
    raise ValueError(f"cannot select {num_samples} samples from a pool of {sizes.sum()}")
  w = np.ones(len(sizes)) if weights is None else np.asarray(weights, np.float64)
  if w.shape != sizes.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
    raise ValueError(f"band weights must be finite and non-negative, got {w}")
  quota = np.zeros_like(sizes)
  open_ = sizes > 0
  while quota.sum() < num_samples:
    left = num_samples - quota.sum()
    ww = np.where(open_, w if np.any(w[open_] > 0) else 1.0, 0.0)
    share = left * ww / ww.sum()
    add = np.floor(share).astype(np.int64)
    # Largest remainders first (ties: earlier band), one sample each.
    remainder = np.where(ww > 0, share - add, -np.inf)
    add[np.argsort(-remainder, kind="stable")[:left - add.sum()]] += 1
    quota = np.minimum(quota + add, sizes)
    open_ = quota < sizes
  return quota


def stratified_indices(c_diff: np.ndarray, c_quant: np.ndarray, steps: np.ndarray,
                       num_steps: int, num_samples: int, bands: int,
                       quota: str = "equal", prompts: np.ndarray | None = None,
                       layout: str = "contiguous") -> np.ndarray:
  """Salient selection within timestep bands, spread over the prompts; indices in pool order.

  `contiguous`: the sampler's steps are split into `bands` contiguous bands of
  (nearly) equal length (0: one band per sample; at most one per step).
  `spread`: each band is one step, the `bands` steps evenly spaced from the
  first to the last (all steps when there are at least as many bands), so
  the product ranks only the prompts at a step. Each band gets its
  quota of samples (`equal`, or ∝ the band's mean diffusion salience for
  `salience`) and keeps its top C̄_diff · C̄_quant, both min-max normalised
  within the band. Global min-max lets the steps where the latent changes most
  (the last few, on zero-terminal-SNR schedules) take every sample; banding
  keeps the whole trajectory in the calibration set.

  With `prompts` (the prompt of each candidate), no prompt takes more than
  ⌈num_samples / number of prompts⌉ samples while another prompt can fill the
  band: C̄_quant is largely a property of the prompt's video, so without the cap
  two or three prompts take nearly every band and calibration sees little of
  the content. Bands are filled best candidate first across all bands.

  Why `spread`: in a band of two steps, C̄_diff (rising along a
  zero-terminal-SNR trajectory) min-max normalises to 0 for nearly every
  candidate of the earlier step, so `contiguous` with more steps than bands
  always skips the same steps, the noisiest one included.
  """
  if quota not in BAND_QUOTAS:
    raise ValueError(f"band quota {quota!r}: choose one of {', '.join(BAND_QUOTAS)}")
  if layout not in BAND_LAYOUTS:
    raise ValueError(f"band layout {layout!r}: choose one of {', '.join(BAND_LAYOUTS)}")
  steps = np.asarray(steps)
  if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or bands < 0:
    raise ValueError(f"bands must be a non-negative integer (0: one per sample), got {bands!r}")
  bands = min(bands or num_samples, num_steps)  # at most one band per step
  if layout == "spread":
    band_of_step = np.full(num_steps, -1)  # -1: a step in no band
    band_of_step[np.round(np.linspace(0, num_steps - 1, bands)).astype(int)] = np.arange(bands)
  else:
    band_of_step = np.arange(num_steps) * bands // num_steps
  band = band_of_step[steps]
  members = [np.flatnonzero(band == b) for b in range(bands)]
  c_diff, c_quant = np.asarray(c_diff, np.float64), np.asarray(c_quant, np.float64)
  weights = None
  if quota == "salience":
    weights = np.array([c_diff[m].mean() if len(m) else 0.0 for m in members])
  left = band_quotas(np.array([len(m) for m in members]), num_samples, weights)
  score = np.full(len(steps), -np.inf)
  for m in members:
    if len(m):
      score[m] = salient_scores(c_diff[m], c_quant[m])
  prompts = np.zeros(len(steps), np.int64) if prompts is None else np.asarray(prompts)
  labels, prompt_ids = np.unique(prompts, return_inverse=True)
  cap = -(-num_samples // len(labels)) if len(labels) > 1 else num_samples
  used = np.zeros(len(labels), np.int64)
  taken = np.zeros(len(steps), bool)
  order = np.argsort(-score, kind="stable")  # ties: the earlier candidate
  for limit in (cap, num_samples):  # the cap first; a second pass fills what it left open
    for i in order:
      if band[i] >= 0 and not taken[i] and left[band[i]] > 0 and used[prompt_ids[i]] < limit:
        taken[i] = True
        left[band[i]] -= 1
        used[prompt_ids[i]] += 1
  return np.flatnonzero(taken)
