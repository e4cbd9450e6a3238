"""Times W4A6 linears against bf16 and XLA's int8 dot, with and without activation quantization.

  python -m pallas_kernels.benchmark [--shapes cogvideox|small|tiny|MxKxN,...]
      [--backends gpu,auto] [--reps 20] [--json F]
      [--block-m 128 --block-n 128 --block-k 256]   # kernel tiles, for tuning

Columns (seconds per call; TOP/s = 2·M·K·N / time):
  bf16            XLA's bf16 matmul, x (M, K) @ W (K, N)
  quant           per-token activation quantization alone (bf16 x → int8 codes + scales)
  modulate        the producer alone: LayerNorm + modulation of a bf16 x, bf16 out
  fused quant     the producer with the quantization fused in: the same LayerNorm +
                  modulation writing int8 codes + scales (`s2q_jax.fused_quant`);
                  compare with modulate + quant
  xla_int8 noq    XLA's int8 dot on ready codes, (N, K) int8 weights, scale/bias epilogue
  xla_int8        the same including the quantization: the `xla_int8` back-end
  <backend>       `w4a6_matmul` on each back-end asked for (packed weights for the
                  Triton and TPU kernels, int8 ones for auto and mosaic_gpu, as
                  deployment holds them); a back-end that fails is reported, not fatal
Each is warmed up, then called `--reps` times with one sync at the end. Every
quantized column's output is checked against `reference` before it is timed
(a mismatch is an error); bf16 records its relative distance from reference
(the quantization error). Results go to stdout and, with --json, to a file
with device, library versions and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import BACKENDS, quantize_weight, reference, w4a6_matmul, xla_int8
from pallas_kernels.timing import loop_time

TOKENS = 17_550 + 226  # CogVideoX, 49 frames at 480×720: video + text tokens
SHAPES = {
    # (M, K, N): CogVideoX-2B (d=1920) and 5B (d=3072) attention and FF linears
    "cogvideox": [(TOKENS, 1920, 1920), (TOKENS, 1920, 7680), (TOKENS, 7680, 1920),
                  (TOKENS, 3072, 3072), (TOKENS, 3072, 12288), (TOKENS, 12288, 3072),
                  (4096, 3072, 3072)],
    "small": [(1000, 256, 256), (1000, 256, 1024), (1000, 1024, 256)],
    "tiny": [(45, 128, 96)],  # a ragged M; CPU smoke test
}
DEFAULT_BACKENDS = {"gpu": "gpu,mosaic_gpu,auto", "tpu": "tpu,auto", "cpu": "auto"}


def environment() -> dict:
  """Device, library versions, date: what every result file records."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "device": f"{dev.platform}: {dev.device_kind}", "cpu_count": os.cpu_count(),
          "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                       "numpy": np.__version__}}


def _check(name: str, out: jax.Array, ref: jax.Array) -> float:
  """Max relative difference from reference; same integers must agree to a bf16 rounding."""
  a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  if a.shape != b.shape or not np.allclose(a, b, rtol=2 ** -7, atol=1e-6):
    raise AssertionError(f"{name}: output differs from reference")
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """A DiT block's LayerNorm + adaptive modulation, float32 (the producer of q/k/v/FF1's input)."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + 1e-5)
  return y * (1 + scale) + shift


def bench(m: int, k: int, n: int, backends: list[str], reps: int, tiles: dict) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
  qw = quantize_weight(w, 4)
  qw8 = qw.unpacked()  # (N, K) int8, unpacked once
  bias = jnp.asarray(rng.standard_normal(n) * 0.1, jnp.float32)
  w_bf16 = jnp.asarray(w, jnp.bfloat16)
  ref = w4a6_matmul(x, qw, bias, backend="reference")
  codes, scales = reference.quantize_activations(x, 6)
  mod_scale, mod_shift = (jnp.asarray(rng.standard_normal(k) * 0.1, jnp.float32) for _ in "ss")

  fns = {
      "bf16": (jax.jit(lambda x, w: x @ w + bias.astype(jnp.bfloat16)), (x, w_bf16)),
      "quant": (jax.jit(lambda x: reference.quantize_activations(x, 6)), (x,)),
      "modulate": (jax.jit(lambda x: _modulate(x, mod_scale, mod_shift).astype(x.dtype)), (x,)),
      "fused quant": (jax.jit(lambda x: reference.quantize_activations(
          _modulate(x, mod_scale, mod_shift), 6)), (x,)),
      "xla_int8 noq": (jax.jit(lambda c, s, qw: xla_int8.matmul(c, s, qw, bias, jnp.bfloat16)),
                       (codes, scales, qw8)),
      "xla_int8": (jax.jit(lambda x, qw: w4a6_matmul(x, qw, bias, backend="xla_int8")),
                   (x, qw8)),
  }
  for b in backends:
    kernel_tiles = tiles if b not in ("auto", "reference", "xla_int8") else {}
    fns[b] = (jax.jit(lambda x, qw, b=b, t=kernel_tiles: w4a6_matmul(x, qw, bias, backend=b,
                                                                       **t)),
              # int8 (N, K) where deployment holds them so (auto) or the kernel needs them
              (x, qw8 if b in ("auto", "xla_int8") or b.startswith("mosaic_gpu") else qw))
  result = {"shape": [m, k, n], "seconds": {}, "rel_diff_vs_reference": {}, "errors": {}}
  for name, (fn, args) in fns.items():
    try:
      out = fn(*args)
    except Exception as e:  # pylint: disable=broad-except  # e.g. mosaic_gpu off Hopper
      result["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
      continue
    if name == "quant":
      np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(codes), err_msg=name)
    elif name == "modulate":
      pass
    elif name == "fused quant":  # vs quantizing the float32 modulation in a pass of its own
      modulated = jax.jit(_modulate)(x, mod_scale, mod_shift)  # stored, then quantized
      want = np.asarray(jax.jit(reference.quantize_activations, static_argnums=1)(
          modulated, 6)[0], np.int32)
      # Fused or not, XLA may contract a multiply-add differently: a rare ±1 at a rounding tie.
      off = np.abs(np.asarray(out[0], np.int32) - want)
      assert off.max() <= 1 and off.mean() < 1e-3, f"{name}: codes differ from quantizing apart"
    elif name == "bf16":  # not the quantized result: record how far it is, check nothing
      a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
      result["rel_diff_vs_reference"][name] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    else:
      result["rel_diff_vs_reference"][name] = _check(name, out, ref)
    result["seconds"][name] = loop_time(fn, *args, reps=reps)
  result["tops"] = {c: 2 * m * k * n / s / 1e12 for c, s in result["seconds"].items()
                    if c not in ("quant", "modulate", "fused quant")}
  return result


def _shapes(spec: str) -> list[tuple[int, int, int]]:
  if spec in SHAPES:
    return SHAPES[spec]
  try:
    return [tuple(int(d) for d in s.split("x")) for s in spec.split(",")]
  except ValueError:
    raise SystemExit(f"--shapes {spec!r}: a preset ({', '.join(SHAPES)}) or MxKxN,...") from None


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=None,
                      help="preset or MxKxN,... (default: cogvideox on GPU/TPU, small on CPU)")
  parser.add_argument("--backends", default=None, help="comma-separated kernel back-ends")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--json", default=None)
  for dim in ("m", "n", "k"):
    parser.add_argument(f"--block-{dim}", type=int, default=None)
  args = parser.parse_args(argv)
  platform = jax.default_backend()
  backends = (args.backends or DEFAULT_BACKENDS.get(platform, "auto")).split(",")
  if bad := [b for b in backends if b not in BACKENDS]:
    parser.error(f"unknown back-end(s) {', '.join(bad)}: choose from {', '.join(BACKENDS)}")
  tiles = {f"block_{d}": v for d in "mnk" if (v := getattr(args, f"block_{d}")) is not None}
  shapes = _shapes(args.shapes or ("small" if platform == "cpu" else "cogvideox"))
  env = environment()
  print(f"{env['device']}, jax {env['versions']['jax']}, back-ends {backends}, tiles {tiles}")
  cols = ["bf16", "quant", "modulate", "fused quant", "xla_int8 noq", "xla_int8", *backends]
  print(f"{'M×K×N':>20} | " + " | ".join(f"{c:>12}" for c in cols) + "   (ms; TOP/s)")
  results = []
  for m, k, n in shapes:
    r = bench(m, k, n, backends, args.reps, tiles)
    results.append(r)
    cells = [f"{r['seconds'][c] * 1e3:6.3f};{r['tops'].get(c, 0):5.3g}" if c in r["seconds"]
             else "error" for c in cols]
    print(f"{f'{m}×{k}×{n}':>20} | " + " | ".join(f"{c:>12}" for c in cells))
    for c, e in r["errors"].items():
      print(f"{'':>20}   {c}: {e}")
  out = {**env, "backends": backends, "tiles": tiles, "reps": args.reps, "results": results}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
