"""`auto` back-end choice: measure the candidates once per device and shape, cache on disk.

At the first call for a problem (device, jax version, M×K×N, bit widths,
weight form, dtypes) each candidate runs on random data of that shape, its
output is checked against `reference`, and a warm-up is followed by a few
timed calls with a single sync. The fastest correct one is written to a JSON
cache (`$S2Q_AUTOTUNE_CACHE`, default `~/.cache/s2q_jax/autotune.json`) and
read from there afterwards. `xla_int8` is always a candidate and a kernel
replaces it only when it is measured at least `MARGIN` faster, so `auto` is
never slower than `xla_int8` beyond timing noise.

`$S2Q_KERNEL_BACKEND=<name>` pins `auto` to one back-end (no measuring); an
explicit `backend=` argument is a pin too. On CPU there is nothing to choose:
the interpret-mode kernels exist for tests, so `auto` is `xla_int8` untimed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.timing import loop_time

PIN_ENV = "S2Q_KERNEL_BACKEND"
CACHE_ENV = "S2Q_AUTOTUNE_CACHE"
MARGIN = 0.97  # a kernel must take < 97% of xla_int8's time to replace it
WARMUP, REPS = 2, 5


@dataclasses.dataclass(frozen=True)
class Problem:
  """What a measurement depends on (besides device and jax version)."""
  m: int
  k: int
  n: int
  w_bits: int
  packed: bool
  act_bits: int
  x_dtype: str
  out_dtype: str

  def key(self) -> str:
    dev = jax.devices()[0]
    form = "packed" if self.packed else "int8"
    return (f"{dev.platform}:{dev.device_kind}|jax {jax.__version__}|{self.m}x{self.k}x{self.n}"
            f"|w{self.w_bits} {form}|a{self.act_bits}|{self.x_dtype}->{self.out_dtype}")


@dataclasses.dataclass(frozen=True)
class Choice:
  backend: str
  tiles: dict | None = None  # None: the back-end's default tiles


def candidates(platform: str) -> list[Choice]:
  """What `auto` measures on `platform`; the first is the fallback (`xla_int8`)."""
  if platform == "gpu":  # int8 wgmma (the Mosaic GPU kernel) exists on Hopper only
    hopper = getattr(jax.devices()[0], "compute_capability", "") == "9.0"
    return [Choice("xla_int8"), Choice("gpu")] + ([Choice("mosaic_gpu")] if hopper else [])
  if platform == "tpu":  # the guide's large tiles, and a smaller set for small problems
    return [Choice("xla_int8"), Choice("tpu"),
            Choice("tpu", dict(block_m=256, block_n=512, block_k=512))]
  return []


def cache_path() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "s2q_jax", "autotune.json")


def _read_cache(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:  # a corrupt cache is re-measured, not fatal
    warnings.warn(f"ignoring unreadable autotune cache {path}: {e}")
    return {}


def _write_cache(path: str, key: str, entry: dict) -> None:
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = _read_cache(path)  # re-read: another process may have added entries
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: readers never see half a file
  except OSError as e:
    warnings.warn(f"could not write the autotune cache {path}: {e}")


def choose(problem: Problem | None) -> Choice:
  """The back-end (and tiles) `auto` runs for `problem` on this device."""
  from pallas_kernels.ops import BACKENDS  # pylint: disable=import-outside-toplevel
  pinned = os.environ.get(PIN_ENV, "")
  if pinned:
    if pinned not in BACKENDS or pinned == "auto":
      raise ValueError(f"${PIN_ENV}={pinned!r}: choose one of "
                       f"{', '.join(b for b in BACKENDS if b != 'auto')}")
    return Choice(pinned)
  cands = candidates(jax.default_backend())
  if not cands:
    return Choice("xla_int8")
  path, key = cache_path(), problem.key()
  entry = _read_cache(path).get(key)
  if isinstance(entry, dict) and entry.get("backend") in BACKENDS:
    return Choice(entry["backend"], entry.get("tiles"))
  entry = measure(problem, cands)
  _write_cache(path, key, entry)
  return Choice(entry["backend"], entry.get("tiles"))


def _name(c: Choice) -> str:
  return c.backend if c.tiles is None else f"{c.backend} {c.tiles}"


def measure(problem: Problem, cands: list[Choice]) -> dict:
  """Times every candidate on random inputs of `problem`'s shape; returns the cache entry."""
  times, errors = _outside_traces(_measure_all, problem, cands)
  fallback = cands[0]
  if _name(fallback) not in times:
    raise RuntimeError(f"autotune: the fallback {_name(fallback)} failed: {errors}")
  best = min((c for c in cands if _name(c) in times), key=lambda c: times[_name(c)])
  if times[_name(best)] >= MARGIN * times[_name(fallback)]:
    best = fallback
  return {"backend": best.backend, "tiles": best.tiles, "seconds": times, "errors": errors,
          "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _measure_all(problem: Problem, cands: list[Choice]) -> tuple[dict, dict]:
  args = _random_problem(problem)
  ref = _run(Choice("reference"), problem, *args)
  times, errors = {}, {}
  for c in cands:
    try:
      out = _run(c, problem, *args)
      if not _agree(out, ref):
        raise ValueError("output differs from reference")
      times[_name(c)] = _time(c, problem, args)
    except Exception as e:  # pylint: disable=broad-except  # a failed candidate is skipped
      errors[_name(c)] = f"{type(e).__name__}: {str(e)[:200]}"
  return times, errors


def _outside_traces(fn, *args):
  """fn(*args) in a fresh thread. `auto` is resolved while the caller's jit traces the
  model, and jax's trace state is per thread: there, the candidates run for real
  instead of being staged into the caller's program."""
  result = {}

  def target():
    try:
      result["value"] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except  # re-raised below
      result["error"] = e
  thread = threading.Thread(target=target, name="s2q-autotune")
  thread.start()
  thread.join()
  if "error" in result:
    raise result["error"]
  return result["value"]


def _random_problem(p: Problem):
  from pallas_kernels.weights import QuantizedWeight  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((p.m, p.k), np.float32), p.x_dtype)
  lo, hi = -(2 ** (p.w_bits - 1)), 2 ** (p.w_bits - 1) - 1
  codes = rng.integers(lo, hi + 1, size=(p.k, p.n), dtype=np.int8)
  qw = QuantizedWeight.from_codes(codes, np.full(p.n, 1e-2, np.float32), p.w_bits)
  if not p.packed:
    qw = qw.unpacked()
  bias = jnp.asarray(rng.standard_normal(p.n), jnp.float32)
  return x, qw, bias


def _run(c: Choice, p: Problem, x, qw, bias) -> jax.Array:
  from pallas_kernels.ops import w4a6_matmul  # pylint: disable=import-outside-toplevel
  return w4a6_matmul(x, qw, bias, act_bits=p.act_bits, backend=c.backend,
                     out_dtype=p.out_dtype, **(c.tiles or {}))


def _agree(out: jax.Array, ref: jax.Array) -> bool:
  """Same integers and float32 epilogue: at most a rounding of the output dtype apart."""
  tol = 4 * float(jnp.finfo(ref.dtype).eps)
  a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  return a.shape == b.shape and bool(np.allclose(a, b, rtol=tol, atol=tol))


def _time(c: Choice, p: Problem, args) -> float:
  """Seconds per call of choice `c` (see `timing.loop_time`)."""
  fn = jax.jit(lambda x, qw, bias: _run(c, p, x, qw, bias))
  return loop_time(fn, *args, reps=REPS, warmup=WARMUP)
