"""Kernel back-ends against the reference, and the reference against exact integer math."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import (QuantizedWeight, dequantize_weight, packing, quantize_weight,
                            reference, unpack_codes, w4a6_matmul)
from pallas_kernels.bits import qrange

SHAPES = [  # (M, K, N): M = 1 and 7, ragged multi-tile M, K and N off the tile sizes
    (1, 64, 96), (7, 96, 64), (130, 256, 128), (300, 512, 384), (33, 300, 130),
]
# Tiles small enough that SHAPES span several of them, and legal on TPU.
TILES = dict(block_m=32, block_n=128, block_k=256)
GPU_TILES = dict(block_m=32, block_n=32, block_k=64)
# Every back-end that runs on CPU, besides `reference` itself.
CPU_BACKENDS = ["xla_int8", "interpret", "tpu_interpret"]


def _case(m, k, n, w_bits, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 5, (m, 1)), dtype)
  qw = quantize_weight(rng.standard_normal((k, n)) * 0.05, w_bits)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  return x, qw, bias


def _exact(x, qw, bias, act_bits, clip=1.0):
  """Independent oracle: numpy int64 matmul of the codes, then the scales."""
  lo, hi = qrange(act_bits)
  xf = np.asarray(x, np.float32)
  xs = np.maximum(np.abs(xf).max(1, keepdims=True), 1e-8) * np.float32(clip) / hi
  xq = np.clip(np.round(xf / xs), lo, hi).astype(np.int64)
  w = np.asarray(unpack_codes(qw)).astype(np.int64)  # (N, K)
  y = (xq @ w.T) * xs * np.asarray(qw.scales)[None]
  return y if bias is None else y + np.asarray(bias)[None]


def _run(x, qw, bias, backend, act_bits=6, **kw):
  tiles = {"interpret": GPU_TILES, "tpu_interpret": TILES}.get(backend, {})
  return w4a6_matmul(x, qw, bias, act_bits=act_bits, backend=backend, **tiles, **kw)


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_equals_reference_float32(m, k, n, backend):
  x, qw, bias = _case(m, k, n, 4, seed=m)
  ref = w4a6_matmul(x, qw, bias, backend="reference")
  # Same integers, same float32 epilogue: equal up to float32 rounding.
  np.testing.assert_allclose(_run(x, qw, bias, backend), ref, rtol=1e-6, atol=1e-6)
  # Weights unpacked to (N, K) int8 at load (what deployment holds for xla_int8): same result.
  np.testing.assert_allclose(_run(x, qw.unpacked(), bias, backend), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ref, _exact(x, qw, bias, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_bits", range(2, 9))
@pytest.mark.parametrize("act_bits", range(2, 9))
def test_reference_is_exact_for_every_bit_width(w_bits, act_bits):
  x, qw, bias = _case(19, 64, 32, w_bits, seed=10 * w_bits + act_bits)
  ref = w4a6_matmul(x, qw, bias, act_bits=act_bits, backend="reference")
  np.testing.assert_allclose(ref, _exact(x, qw, bias, act_bits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w_bits,act_bits", [(2, 8), (3, 6), (4, 4), (5, 6), (6, 3), (7, 7),
                                             (8, 8), (4, 2)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernels_every_bit_width(w_bits, act_bits, backend):
  x, qw, bias = _case(40, 128, 64, w_bits, seed=w_bits)
  ref = w4a6_matmul(x, qw, bias, act_bits=act_bits, backend="reference")
  np.testing.assert_allclose(_run(x, qw, bias, backend, act_bits), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_and_batch_dims(backend):
  x, qw, bias = _case(2 * 3 * 11, 128, 96, 4, seed=5, dtype=jnp.bfloat16)
  xb = x.reshape(2, 3, 11, 128)
  ref = w4a6_matmul(xb, qw, bias, backend="reference")
  out = _run(xb, qw, bias, backend)
  assert out.shape == (2, 3, 11, 96) and out.dtype == jnp.bfloat16
  # Identical integer math; at most the final rounding to bf16 (one ulp) may differ.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8, atol=1e-6)
  # bf16 input quantizes to the same codes as its float32 copy.
  ref32 = w4a6_matmul(xb.astype(jnp.float32), qw, bias, backend="reference")
  np.testing.assert_allclose(np.asarray(ref, np.float32), ref32, rtol=2 ** -8, atol=1e-6)


def test_activation_codes_match_numpy_up_to_ties():
  """bf16 inputs often sit exactly on a .5 tie of x / scale; XLA may divide via a
  reciprocal and round such a tie the other way. Everywhere else: identical."""
  x = jnp.asarray(np.random.default_rng(3).standard_normal((64, 128)), jnp.bfloat16)
  codes, scales = reference.quantize_activations(x, 6)
  xf = np.asarray(x, np.float32)
  ratio = xf / (np.maximum(np.abs(xf).max(1, keepdims=True), 1e-8) / 31)
  expected = np.clip(np.round(ratio), -32, 31)
  tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-5
  codes = np.asarray(codes)
  np.testing.assert_array_equal(codes[~tie], expected[~tie])
  assert np.abs(codes[tie] - expected[tie]).max(initial=0) <= 1
  np.testing.assert_allclose(scales, np.abs(xf).max(1, keepdims=True) / 31, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_bias_and_zero_rows(backend):
  x, qw, _ = _case(9, 64, 32, 4)
  x = x.at[3].set(0.0)  # an all-zero token must give exactly zero, not NaN
  out = _run(x, qw, None, backend)
  np.testing.assert_allclose(out, w4a6_matmul(x, qw, backend="reference"), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, _exact(x, qw, None, 6), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out[3]) == 0)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 45, 130])  # 45, 130: ragged against every kernel's row tile
def test_act_clip_and_bf16_output_against_the_integer_oracle(backend, m):
  x, qw, bias = _case(m, 256, 160, 4, seed=m + 1)
  clip = jnp.asarray(0.45)
  out = _run(x, qw, bias, backend, act_clip=clip, out_dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16 and out.shape == (m, 160)
  exact = _exact(x, qw, bias, 6, clip=0.45)
  np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2 ** -8, atol=1e-5)
  # The clip matters: min-max scaling gives other codes, hence another output.
  assert not np.allclose(exact, _exact(x, qw, bias, 6), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_in_bf16_out_with_clip_equals_reference(backend):
  x, qw, bias = _case(77, 128, 96, 4, seed=4, dtype=jnp.bfloat16)
  ref = w4a6_matmul(x, qw, bias, act_clip=0.6, backend="reference")
  out = _run(x, qw.unpacked(), bias, backend, act_clip=0.6)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8, atol=1e-6)


def test_xla_int8_is_one_int8_dot_on_unpacked_weights():
  """No unpacking in the program when the weight was unpacked at load, and the dot
  is int8 × int8 → int32 (an s32 dot in the optimised HLO)."""
  x, qw, bias = _case(64, 128, 96, 4, dtype=jnp.bfloat16)
  fn = jax.jit(lambda x, qw, b: w4a6_matmul(x, qw, b, backend="xla_int8"))
  hlo = fn.lower(x, qw.unpacked(), bias).compile().as_text()
  assert "u8[" not in hlo and "s32[64,96]" in hlo
  assert "u8[96,64]" in fn.lower(x, qw, bias).compile().as_text()  # packed: unpacked per call


def test_unpacked_weight_form():
  qw = quantize_weight(np.random.default_rng(1).standard_normal((64, 24)), 4)
  un = qw.unpacked()
  assert qw.packed and not un.packed and un.bits == 4 and un.in_features == 64
  assert un.data.dtype == jnp.int8 and un.data.shape == (24, 64) and un.unpacked() is un
  np.testing.assert_array_equal(np.asarray(un.data), np.asarray(unpack_codes(qw)))
  np.testing.assert_array_equal(dequantize_weight(un), dequantize_weight(qw))


@pytest.mark.parametrize("m_tiles,n_tiles", [(1, 1), (5, 3), (8, 2), (17, 4), (9, 60)])
def test_gpu_program_order_visits_every_tile_once(m_tiles, n_tiles):
  from pallas_kernels.pallas_gpu import GROUP_M, tile_ids
  ids = [tuple(int(v) for v in tile_ids(jnp.int32(p), m_tiles, n_tiles))
         for p in range(m_tiles * n_tiles)]
  assert sorted(ids) == [(i, j) for i in range(m_tiles) for j in range(n_tiles)]
  # Consecutive programs share column tiles across up to GROUP_M row tiles.
  assert {j for _, j in ids[:min(GROUP_M, m_tiles)]} == {0}


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("m,k,n", [(17_776, 1920, 7680), (17_776, 7680, 1920), (7, 96, 96),
                                   (17_776, 3072, 12288), (17_776, 12288, 3072)])
def test_kernels_lower_for_their_hardware(backend, platform, m, k, n):
  """Cross-lowers on CPU: catches Triton's power-of-two and Mosaic's tiling rules
  (compiling the lowered IR still needs the device)."""
  qw = quantize_weight(np.ones((k, n), np.float32), 4)
  fn = jax.jit(lambda x, qw: w4a6_matmul(x, qw, backend=backend))
  target = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
  text = export.export(fn, platforms=[platform],
                       disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16), qw).mlir_module()
  assert f"custom_call @{target}" in text


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_with_unpacked_int8_weights(backend, platform):
  """What a pinned kernel gets from a layer deployed with `auto` (int8 codes, not bytes)."""
  qw = quantize_weight(np.ones((1920, 7680), np.float32), 4).unpacked()
  fn = jax.jit(lambda x, qw: w4a6_matmul(x, qw, backend=backend))
  target = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
  text = export.export(fn, platforms=[platform],
                       disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
      jax.ShapeDtypeStruct((17_776, 1920), jnp.bfloat16), qw).mlir_module()
  assert f"custom_call @{target}" in text and "ui8" not in text


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_every_value(bits):
  lo, hi = qrange(bits)
  values = np.arange(lo, hi + 1, dtype=np.int8)
  codes = np.stack([np.roll(values, r) for r in range(3)])[:, : (len(values) // 2) * 2]
  packed = packing.pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.shape[1] == -(-codes.shape[1] * bits // 8)
  np.testing.assert_array_equal(packing.unpack(packed, bits, codes.shape[1]), codes)
  qw = QuantizedWeight.from_codes(codes.T, np.ones(3, np.float32), bits)
  np.testing.assert_array_equal(np.asarray(unpack_codes(qw)), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_weight_invariants(bits):
  w = np.random.default_rng(bits).standard_normal((64, 24)).astype(np.float32)
  qw = quantize_weight(w, bits)
  codes = np.asarray(unpack_codes(qw))
  lo, hi = qrange(bits)
  assert codes.shape == (24, 64) and codes.min() >= lo and codes.max() <= hi
  np.testing.assert_allclose(qw.scales, np.abs(w).max(0) / hi, rtol=1e-6)
  # Values on the grid come back exactly; requantizing is idempotent.
  deq = np.asarray(dequantize_weight(qw))
  np.testing.assert_array_equal(np.asarray(unpack_codes(quantize_weight(deq, bits))), codes)
  assert np.abs(deq - w).max() <= np.asarray(qw.scales).max() / 2 + 1e-6


def test_storage_and_nbytes():
  qw = quantize_weight(np.ones((64, 8)), 4)
  assert qw.data.dtype == jnp.uint8 and qw.data.shape == (8, 32)  # (N, K/2): two per byte
  assert qw.nbytes == 8 * 32 + 8 * 4
  qw6 = quantize_weight(np.ones((64, 8)), 6)
  assert qw6.data.dtype == jnp.int8 and qw6.data.shape == (8, 64) and qw6.nbytes == 8 * 64 + 32


def test_from_codes_keeps_given_integers():
  codes = np.random.default_rng(0).integers(-8, 8, size=(32, 16)).astype(np.int8)
  scales = np.linspace(0.1, 1.0, 16).astype(np.float32)
  qw = QuantizedWeight.from_codes(codes, scales, 4)
  np.testing.assert_array_equal(np.asarray(unpack_codes(qw)).T, codes)
  np.testing.assert_allclose(dequantize_weight(qw), codes * scales, rtol=1e-6)


def test_bad_inputs_are_refused():
  x, qw, bias = _case(4, 64, 32, 4)
  with pytest.raises(ValueError, match="features"):
    w4a6_matmul(x[:, :32], qw)
  with pytest.raises(ValueError, match="act_bits"):
    w4a6_matmul(x, qw, act_bits=9)
  with pytest.raises(ValueError, match="act_bits"):
    w4a6_matmul(x, qw, act_bits=1)
  with pytest.raises(ValueError, match="backend"):
    w4a6_matmul(x, qw, backend="cuda")
  with pytest.raises(ValueError, match="bias"):
    w4a6_matmul(x, qw, bias[:3])
  with pytest.raises(ValueError, match="even"):
    quantize_weight(np.ones((63, 8)), 4)
  with pytest.raises(ValueError, match="from 2 to 8"):
    quantize_weight(np.ones((64, 8)), 1)
  with pytest.raises(ValueError, match="range"):
    QuantizedWeight.from_codes(np.full((64, 8), 8, np.int8), np.ones(8), 4)
  with pytest.raises(ValueError, match="scales"):
    QuantizedWeight.from_codes(np.zeros((64, 8), np.int8), np.ones(7), 4)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("m,k,n", [(17_776, 1920, 1920), (17_776, 7680, 1920), (130, 256, 128),
                                   (7, 96, 96)])
def test_gpu_kernel_equals_reference(m, k, n):
  x, qw, bias = _case(m, k, n, 4, dtype=jnp.bfloat16)
  ref = w4a6_matmul(x, qw, bias, backend="reference")
  out = w4a6_matmul(x, qw, bias, backend="gpu")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8, atol=1e-6)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("m,k,n", [(17_776, 1920, 1920), (130, 256, 128), (7, 96, 96)])
def test_tpu_kernel_equals_reference(m, k, n):
  x, qw, bias = _case(m, k, n, 4, dtype=jnp.bfloat16)
  ref = w4a6_matmul(x, qw, bias, backend="reference")
  out = w4a6_matmul(x, qw, bias, backend="tpu")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8, atol=1e-6)


def test_benchmark_runs_on_cpu(capsys, tmp_path):
  """Smoke test at a tiny ragged shape: every column timed, outputs checked, JSON written."""
  import json
  from pallas_kernels import benchmark
  path = tmp_path / "kernels.json"
  benchmark.main(["--shapes", "tiny", "--reps", "2", "--backends", "xla_int8,interpret,auto",
                  "--block-m", "32", "--block-n", "32", "--block-k", "64", "--json", str(path)])
  assert "45×128×96" in capsys.readouterr().out
  result = json.loads(path.read_text())
  assert result["versions"]["jax"] == jax.__version__ and result["device"].startswith("cpu")
  r, = result["results"]
  assert r["shape"] == [45, 128, 96]
  assert set(r["seconds"]) == {"bf16", "quant", "modulate", "fused quant", "xla_int8 noq",
                               "xla_int8", "interpret", "auto"} and not r["errors"]
  assert all(s > 0 for s in r["seconds"].values())
  # Quantized columns equal the reference; bf16 is off by the quantization error.
  assert max(v for k, v in r["rel_diff_vs_reference"].items() if k != "bf16") < 2 ** -7
  assert 1e-3 < r["rel_diff_vs_reference"]["bf16"] < 0.2


def test_benchmark_check_catches_a_wrong_output():
  from pallas_kernels import benchmark
  ref = jnp.ones((4, 4), jnp.bfloat16)
  assert benchmark._check("same", ref, ref) == 0.0
  with pytest.raises(AssertionError, match="differs from reference"):
    benchmark._check("off", ref * 1.1, ref)
