"""Choosing calibration samples from the candidate pool by salience (or baselines for ablation)."""
from __future__ import annotations

import numpy as np

METHODS = ("salient", "uniform", "random")


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
  random: a seeded draw without replacement.
  """
  if method not in METHODS:
    raise ValueError(f"selection method {method!r}: choose one of {', '.join(METHODS)}")
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
