"""Choosing calibration samples from the candidate pool by salience (or baselines for ablation)."""
from __future__ import annotations

import numpy as np

METHODS = ("salient", "uniform", "random")


def minmax_normalize(scores: np.ndarray) -> np.ndarray:
  """Scores mapped to [0, 1] over the pool; a constant pool maps to all ones."""
  scores = np.asarray(scores, np.float64)
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
  if not 1 <= num_samples <= n:
    raise ValueError(f"cannot select {num_samples} samples from a pool of {n}")
  if method == "salient":
    if scores is None:
      raise ValueError("salient selection needs scores")
    chosen = np.argsort(-np.asarray(scores), kind="stable")[:num_samples]
  elif method == "uniform":
    chosen = np.round(np.linspace(0, n - 1, num_samples)).astype(int)
  else:
    chosen = np.random.default_rng(seed).choice(n, num_samples, replace=False)
  return np.sort(chosen)
