"""Timing a jitted call the way the benchmarks and the autotuner both need."""
from __future__ import annotations

import time

import jax


def loop_time(fn, *args, reps: int, warmup: int = 2) -> float:
  """Seconds per call: `warmup` synced calls (compile included), then `reps` calls, one sync
  (no per-call host round trip)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = None
  for _ in range(reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps
