"""Times W4A6 linears against bf16 and the simple int8 alternative, in one table.

  python -m pallas_kernels.benchmark [--shapes cogvideox|small] [--backend auto]
      [--block-m 128 --block-n 128 --block-k 256]   # kernel tiles, for tuning

Columns, all with activation quantization included where it applies:
  bf16        XLA's bf16 matmul, x (M, K) @ W (K, N)
  xla_int8    int4 codes unpacked to int8 ahead of time, XLA's int8 dot with
              (N, K) weights (the floor a fused kernel has to beat)
  kernel      `w4a6_matmul` on the chosen back-end (packed int4 weights)
TOP/s = 2·M·K·N / time.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ops, quantize_weight, reference, unpack_codes, w4a6_matmul

TOKENS = 17_550 + 226  # CogVideoX-2B, 49 frames at 480×720: video + text tokens
SHAPES = {
    # (M, K, N): CogVideoX-2B (d=1920) and 5B (d=3072) attention and FF linears
    "cogvideox": [(TOKENS, 1920, 1920), (TOKENS, 1920, 7680), (TOKENS, 7680, 1920),
                  (TOKENS, 3072, 3072), (TOKENS, 3072, 12288), (TOKENS, 12288, 3072),
                  (4096, 3072, 3072)],
    "small": [(1000, 256, 256), (1000, 256, 1024), (1000, 1024, 256)],
}


def time_fn(fn, *args, reps: int) -> float:
  """Median wall time of `fn(*args)` after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench(m: int, k: int, n: int, backend: str, reps: int, tiles: dict) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
  qw = quantize_weight(w, 4)
  w_bf16 = jnp.asarray(w, jnp.bfloat16)
  w_int8 = unpack_codes(qw)  # (N, K) int8, unpacked once

  bf16 = jax.jit(lambda x, w: x @ w)

  @jax.jit
  def xla_int8(x, w_int8, scales):
    codes, x_scales = reference.quantize_activations(x, 6)
    acc = jax.lax.dot_general(codes, w_int8, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return reference.epilogue(acc, x_scales, scales, None, x.dtype)

  kernel = jax.jit(lambda x, qw: w4a6_matmul(x, qw, backend=backend, **tiles))
  times = {"bf16": time_fn(bf16, x, w_bf16, reps=reps),
           "xla_int8": time_fn(xla_int8, x, w_int8, qw.scales, reps=reps),
           "kernel": time_fn(kernel, x, qw, reps=reps)}
  return {"shape": (m, k, n), **times}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                      help="default: cogvideox on GPU/TPU, small on CPU")
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--reps", type=int, default=10)
  for dim, default in (("m", 128), ("n", 128), ("k", 256)):
    parser.add_argument(f"--block-{dim}", type=int, default=default)
  args = parser.parse_args(argv)
  tiles = dict(block_m=args.block_m, block_n=args.block_n, block_k=args.block_k)
  platform = jax.default_backend()
  shapes = SHAPES[args.shapes or ("small" if platform == "cpu" else "cogvideox")]
  print(f"device: {jax.devices()[0].device_kind} ({platform}), kernel back-end: "
        f"{ops.resolve_backend(args.backend)}, tiles: {tiles}")
  header = (f"{'M×K×N':>22} | {'bf16 ms':>8} {'TOP/s':>6} | {'int8 ms':>8} {'TOP/s':>6} | "
            f"{'kernel ms':>9} {'TOP/s':>6} | {'vs bf16':>7} {'vs int8':>7}")
  print(header + "\n" + "-" * len(header))
  for m, k, n in shapes:
    r = bench(m, k, n, args.backend, args.reps, tiles)
    tops = {c: 2 * m * k * n / r[c] / 1e12 for c in ("bf16", "xla_int8", "kernel")}
    print(f"{f'{m}×{k}×{n}':>22} | {r['bf16'] * 1e3:8.3f} {tops['bf16']:6.3g} | "
          f"{r['xla_int8'] * 1e3:8.3f} {tops['xla_int8']:6.3g} | {r['kernel'] * 1e3:9.3f} "
          f"{tops['kernel']:6.3g} | {r['bf16'] / r['kernel']:6.2f}× "
          f"{r['xla_int8'] / r['kernel']:6.2f}×")


if __name__ == "__main__":
  main()
