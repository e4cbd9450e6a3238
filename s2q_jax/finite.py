"""Stopping at the first stage that produces NaN or Inf, instead of reporting NaN metrics.

A non-finite value propagates silently through sampling, calibration and the
metrics (PSNR of NaN videos is NaN), so each stage's output is checked and the
job stops naming the stage; nothing non-finite is cached or reported.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from s2q_jax.errors import UserError


def check_arrays(stage: str, arrays: Mapping[str, np.ndarray], hint: str = "") -> None:
  """Raises `UserError` naming `stage` and the arrays with NaN or Inf values."""
  bad = [f"{name} ({_count(a)} of {np.size(a)} values)" for name, a in arrays.items()
         if not np.all(np.isfinite(np.asarray(a)))]
  if bad:
    raise UserError(f"{stage} produced non-finite values (NaN or Inf) in {', '.join(bad)}"
                    + (f": {hint}" if hint else ""))


def check_metrics(scores: Mapping[str, float]) -> None:
  """NaN metrics are a bug or bad videos; PSNR may be +inf (identical videos)."""
  bad = [k for k, v in scores.items() if math.isnan(v) or (k != "psnr" and math.isinf(v))]
  if bad:
    raise UserError(f"evaluation produced non-finite metrics: {', '.join(bad)} "
                    f"({', '.join(f'{k}={scores[k]}' for k in bad)})")


def _count(a: np.ndarray) -> int:
  return int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a))))
