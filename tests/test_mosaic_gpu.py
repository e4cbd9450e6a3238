"""The Mosaic-GPU (plgpu) kernel: interpreted on CPU against the reference, lowered for sm_90."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import QuantizedWeight, mosaic_gpu, quantize_weight, reference, w4a6_matmul

# Small tiles so these shapes span several row, column and K tiles; the persistent grid
# then has fewer blocks than tiles (each block loops), and the last row tile is ragged.
TILES = dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2)


def _codes(m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-32, 32, (m, k)), jnp.int8)
  xs = jnp.asarray(rng.uniform(0.01, 1, (m, 1)), jnp.float32)
  w = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int8)
  ws = jnp.asarray(rng.uniform(0.01, 1, n), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  return x, xs, w, ws, bias


@pytest.mark.parametrize("m,k,n", [(1, 64, 96), (130, 256, 128), (33, 300, 130)])
def test_interpreted_kernel_equals_reference_without_races(m, k, n):
  """M = 1, a ragged multi-tile M, and N and K off the tiles (zero-padded). The race
  detector (slow) checks the pipeline's and the epilogue's synchronisation on one shape."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  x, xs, w, ws, bias = _codes(m, k, n, seed=m)
  for out_dtype in (jnp.float32, jnp.bfloat16):
    ref = reference.int_matmul(x, xs, w, ws, bias, out_dtype)
    out = mosaic_gpu.matmul(x, xs, w, ws, bias, out_dtype=out_dtype, num_sms=3, **TILES,
                            interpret=mosaic_gpu.interpret_params(detect_races=m == 130))
    assert out.dtype == out_dtype
    # Same integers and float32 epilogue: equal up to the rounding of a fused multiply-add
    # (relative to the output's scale where the bias cancels the product).
    a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    eps = 4 * float(jnp.finfo(out_dtype).eps)
    np.testing.assert_allclose(a, b, rtol=eps, atol=eps * np.abs(b).max())
    assert not interpret_pallas_call.get_races().races_found


def test_backend_with_activation_quantization_and_packed_weights():
  """Through `w4a6_matmul`: bf16 in and out, act_clip, 4-bit packed and int8 weights."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((70, 128)) * rng.uniform(0.1, 5, (70, 1)), jnp.bfloat16)
  qw = quantize_weight(rng.standard_normal((128, 192)) * 0.05, 4)
  bias = jnp.asarray(rng.standard_normal(192), jnp.float32)
  ref = w4a6_matmul(x, qw, bias, act_clip=0.8, backend="reference")
  out = w4a6_matmul(x, qw, bias, act_clip=0.8, backend="mosaic_gpu_interpret",
                    block_m=64, block_n=64, block_k=64)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8)


@pytest.mark.parametrize("m,k,n", [(17_776, 1920, 7680), (17_776, 7680, 1920), (7, 96, 96)])
def test_lowers_for_hopper_on_cpu(m, k, n):
  """Mosaic GPU lowers in Python, so a CPU jaxlib checks layouts, shared-memory transforms
  and the pipeline at the model's sizes; compiling to SASS still needs a GPU."""
  # (N, K) int8 codes, as deployment holds them for `auto`; shapes only, no data.
  qw = QuantizedWeight(jax.ShapeDtypeStruct((n, k), jnp.int8),
                       jax.ShapeDtypeStruct((n,), jnp.float32), 4, k)
  fn = jax.jit(lambda x, qw: w4a6_matmul(x, qw, backend="mosaic_gpu"))
  text = export.export(fn, platforms=["cuda"])(
      jax.ShapeDtypeStruct((m, k), jnp.bfloat16), qw).mlir_module()
  assert set(re.findall(r"custom_call @(\w+)", text)) == {"mosaic_gpu_v2"}


def test_bad_pipeline_depth_is_refused():
  x, xs, w, ws, bias = _codes(8, 64, 64)
  with pytest.raises(ValueError, match="max_concurrent_steps=1"):
    mosaic_gpu.matmul(x, xs, w, ws, bias, out_dtype=jnp.float32, block_m=64, block_n=64,
                      block_k=64, max_concurrent_steps=1)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or
                    getattr(jax.devices()[0], "compute_capability", "") != "9.0",
                    reason="needs a Hopper GPU (int8 wgmma)")
@pytest.mark.parametrize("m,k,n", [(17_776, 1920, 1920), (17_776, 7680, 1920), (45, 128, 96),
                                   (7, 96, 96)])
def test_hopper_kernel_equals_reference(m, k, n):
  x, xs, w, ws, bias = _codes(m, k, n)
  ref = reference.int_matmul(x, xs, w, ws, bias, jnp.bfloat16)
  out = mosaic_gpu.matmul(x, xs, w, ws, bias, out_dtype=jnp.bfloat16, **mosaic_gpu.DEFAULT_TILES)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -8)
