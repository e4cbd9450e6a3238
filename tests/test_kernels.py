"""Kernel back-ends against the reference, and the reference against exact integer math."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (QuantizedWeight, dequantize_weight, quantize_weight, unpack_codes,
                            w4a6_matmul)
from pallas_kernels.bits import qrange

SHAPES = [  # (M, K, N): ragged M, small M, K needing padding, N not a multiple of the tile
    (1, 64, 96), (7, 96, 64), (130, 256, 128), (300, 512, 384), (33, 300, 130),
]


def _case(m, k, n, w_bits, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 5, (m, 1)), dtype)
  qw = quantize_weight(rng.standard_normal((k, n)) * 0.05, w_bits)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  return x, qw, bias


def _exact(x, qw, bias, act_bits):
  """Independent oracle: numpy int64 matmul of the codes, then the scales."""
  lo, hi = qrange(act_bits)
  xf = np.asarray(x, np.float32)
  xs = np.maximum(np.abs(xf).max(1, keepdims=True), 1e-8) / hi
  xq = np.clip(np.round(xf / xs), lo, hi).astype(np.int64)
  w = np.asarray(unpack_codes(qw)).astype(np.int64)  # (N, K)
  return (xq @ w.T) * xs * np.asarray(qw.scales)[None] + np.asarray(bias)[None]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
def test_kernel_equals_reference_float32(m, k, n, backend):
  x, qw, bias = _case(m, k, n, 4, seed=m)
  ref = w4a6_matmul(x, qw, bias, backend="reference")
  out = w4a6_matmul(x, qw, bias, backend=backend, block_m=64, block_n=64, block_k=128)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(ref, _exact(x, qw, bias, 6), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("w_bits,act_bits", [(2, 8), (3, 6), (4, 4), (5, 6), (8, 8), (4, 2)])
def test_every_bit_width(w_bits, act_bits):
  x, qw, bias = _case(40, 128, 64, w_bits, seed=w_bits)
  ref = w4a6_matmul(x, qw, bias, act_bits=act_bits, backend="reference")
  np.testing.assert_allclose(ref, _exact(x, qw, bias, act_bits), rtol=1e-5, atol=1e-4)
  for backend in ("interpret", "tpu_interpret"):
    out = w4a6_matmul(x, qw, bias, act_bits=act_bits, backend=backend, block_m=32, block_n=32,
                      block_k=64)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-5)


def test_bfloat16_and_batch_dims():
  x, qw, bias = _case(2 * 3 * 11, 128, 96, 4, seed=5, dtype=jnp.bfloat16)
  xb = x.reshape(2, 3, 11, 128)
  ref = w4a6_matmul(xb, qw, bias, backend="reference")
  out = w4a6_matmul(xb, qw, bias, backend="interpret")
  assert out.shape == (2, 3, 11, 96) and out.dtype == jnp.bfloat16
  # Identical integer math; only the final rounding to bf16 may differ.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -7, atol=1e-2)


def test_no_bias():
  x, qw, _ = _case(9, 64, 32, 4)
  np.testing.assert_allclose(w4a6_matmul(x, qw, backend="interpret"),
                             w4a6_matmul(x, qw, backend="reference"), rtol=1e-6, atol=1e-5)


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


def test_four_bit_weights_are_packed_two_per_byte():
  qw = quantize_weight(np.ones((64, 8)), 4)
  assert qw.data.dtype == jnp.uint8 and qw.data.shape == (8, 32)
  assert qw.nbytes == 8 * 32 + 8 * 4


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
  with pytest.raises(ValueError, match="backend"):
    w4a6_matmul(x, qw, backend="cuda")
  with pytest.raises(ValueError, match="bias"):
    w4a6_matmul(x, qw, bias[:3])
  with pytest.raises(ValueError, match="even"):
    quantize_weight(np.ones((63, 8)), 4)
  with pytest.raises(ValueError, match="from 2 to 8"):
    quantize_weight(np.ones((64, 8)), 1)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("m,k,n", [(17776, 1920, 1920), (130, 256, 128)])
def test_gpu_kernel_equals_reference(m, k, n):
  x, qw, bias = _case(m, k, n, 4, dtype=jnp.bfloat16)
  ref = w4a6_matmul(x, qw, bias, backend="reference")
  out = w4a6_matmul(x, qw, bias, backend="gpu")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -7, atol=1e-2)
