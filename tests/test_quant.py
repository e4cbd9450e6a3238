"""Quantizers and QuantLinear: ranges, idempotence, per-token/per-channel scales, exact folding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax import quant
from s2q_jax.models.layers import Linear
from pallas_kernels import packing
from s2q_jax.quant import quantizer


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_stay_in_range_and_dequant_is_idempotent(bits):
  x = _x((64, 32)) * 3
  scale = quantizer.activation_scales(x, bits)
  codes = quantizer.quantize(x, scale, bits)
  lo, hi = quant.qrange(bits)
  assert float(codes.min()) >= lo and float(codes.max()) <= hi
  np.testing.assert_array_equal(codes, jnp.round(codes))
  once = quant.fake_quant_activations(x, bits)
  np.testing.assert_allclose(quant.fake_quant_activations(once, bits), once, rtol=1e-6, atol=1e-7)


def test_six_bit_grid_is_minus_32_to_31():
  assert quant.qrange(6) == (-32, 31)
  # Values already on a 6-bit grid with absmax 31·s come back exactly.
  s = 0.125
  grid = jnp.arange(-31, 32, dtype=jnp.float32)[None, :] * s
  np.testing.assert_array_equal(quant.fake_quant_activations(grid, 6), grid)


def test_per_token_scales_are_independent():
  x = _x((8, 16))
  y = x.at[3].multiply(100.0)  # one token with a huge range
  qx, qy = quant.fake_quant_activations(x, 6), quant.fake_quant_activations(y, 6)
  others = np.arange(8) != 3
  np.testing.assert_array_equal(np.asarray(qx)[others], np.asarray(qy)[others])


def test_weight_scales_are_per_output_channel():
  w = _x((16, 4))
  w = w.at[:, 2].multiply(50.0)
  scales = quant.weight_scales(w, 4)
  # Stored (and used) as float16 values: half a float16 ulp from the exact absmax / 7.
  np.testing.assert_allclose(scales, np.abs(np.asarray(w)).max(0) / 7, rtol=2.0**-11)
  np.testing.assert_array_equal(scales, np.asarray(scales).astype(np.float16))


def test_zero_tokens_and_channels_stay_zero():
  x = jnp.zeros((3, 8))
  np.testing.assert_array_equal(quant.fake_quant_activations(x, 6), x)
  layer = _qlinear(jnp.zeros((8, 4)), 4, 6)
  np.testing.assert_array_equal(layer.dequantized_kernel(), jnp.zeros((8, 4)))


def _qlinear(kernel, w_bits, a_bits, bias=None):
  lin = Linear(kernel.shape[0], kernel.shape[1], use_bias=bias is not None, rngs=nnx.Rngs(0))
  lin.kernel[...] = kernel
  if bias is not None:
    lin.bias[...] = bias
  return quant.QuantLinear(lin, w_bits=w_bits, a_bits=a_bits, path="test")


def test_error_falls_as_bits_rise():
  w, x = _x((64, 48), 1) * 0.1, _x((32, 64), 2)
  ref = x @ w
  errors = [float(jnp.mean((_qlinear(w, b, b)(x) - ref) ** 2)) for b in (3, 4, 6, 8)]
  assert errors == sorted(errors, reverse=True)
  assert errors[-1] < 1e-3 * float(jnp.mean(ref**2))


def test_forward_is_exact_integer_arithmetic():
  """QuantLinear's output equals an int64 matmul of the exported codes, then the scales."""
  w, x, b = _x((32, 24), 3), _x((10, 32), 4), _x((24,), 5)
  layer = _qlinear(w, 4, 6, bias=b)
  layer.freeze()
  exported = {k: np.asarray(v) for k, v in layer.export().items()}
  xs = np.abs(np.asarray(x)).max(1, keepdims=True) / 31
  xq = np.clip(np.round(np.asarray(x) / xs), -32, 31).astype(np.int64)
  acc = xq @ exported["codes"].astype(np.int64)
  expected = acc * xs * exported["scales"][None, :] + exported["bias"]
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_freeze_keeps_codes_fixed_when_weights_change():
  w = _x((16, 8), 6)
  layer = _qlinear(w, 4, None)
  before = layer.dequantized_kernel()
  layer.freeze()
  layer.kernel[...] = w * 3  # frozen codes, not the kernel, now define the layer
  np.testing.assert_array_equal(layer.dequantized_kernel(), before)


def test_smoothing_and_rotation_fold_exactly():
  """With FP activations and 8-bit weights, transforms change only the quantization grid."""
  w, x = _x((16, 8), 7), _x((5, 16), 8)
  q, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((16, 16)))
  layer = _qlinear(w, 8, None)
  layer.smooth = quant.SmoothScale(jnp.linspace(0.5, 2.0, 16))
  layer.rotation = quant.Rotation(jnp.asarray(q, jnp.float32))
  folded = layer.transform_input(x) @ layer.effective_kernel()
  np.testing.assert_allclose(folded, x @ w, rtol=1e-5, atol=1e-5)
  ref = x @ w
  assert float(jnp.linalg.norm(layer(x) - ref) / jnp.linalg.norm(ref)) < 0.01


def test_clip_gets_finite_gradients():
  w, x = _x((16, 8), 10), _x((4, 16), 11)
  layer = _qlinear(w, 3, 6)

  def loss(model):
    return jnp.mean((model(x) - x @ w) ** 2)

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, quant.WeightClip))(layer)
  g = grads.clip[...]
  assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trips_every_code(bits):
  lo, hi = quant.qrange(bits)
  codes = np.random.default_rng(bits).integers(lo, hi + 1, size=(5, 37)).astype(np.int8)
  packed = packing.pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.shape == (5, -(-37 * bits // 8))
  np.testing.assert_array_equal(packing.unpack(packed, bits, 37), codes)


def test_four_bit_packing_is_two_nibbles_per_byte():
  codes = np.array([[-8, 7, 0, -1]], np.int8)
  # Offset to unsigned (+8): 0, 15, 8, 7 → bytes 0xF0 (even k in the low nibble), 0x78.
  np.testing.assert_array_equal(packing.pack(codes, 4), np.array([[0xF0, 0x78]], np.uint8))


def test_bad_bits_are_refused():
  with pytest.raises(ValueError, match="from 2 to 8"):
    quant.check_bits(9)
  with pytest.raises(ValueError, match="from 2 to 8"):
    _qlinear(_x((4, 4)), 1, 6)
  with pytest.raises(ValueError, match="outside"):
    packing.pack(np.array([[8]], np.int8), 4)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_codes_in_range_and_requantization_is_exact(bits):
  w = _x((24, 10), 12)
  clip = jnp.linspace(0.5, 1.0, 10)  # clipped channels reach the lowest code too
  scales = quant.weight_scales(w, bits, clip)
  codes = quant.quantize(w, scales, bits)
  lo, hi = quant.qrange(bits)
  assert float(codes.min()) >= lo and float(codes.max()) <= hi
  assert float(codes.min()) == lo
  np.testing.assert_array_equal(codes, jnp.round(codes))
  # Dequantized weights requantize to the very same codes (values may move by an ulp of the scale).
  once = quant.fake_quant_weights(w, bits)
  s1 = quant.weight_scales(once, bits)
  np.testing.assert_array_equal(quant.quantize(once, s1, bits),
                                quant.quantize(w, quant.weight_scales(w, bits), bits))


def test_weights_on_the_grid_are_reproduced_exactly():
  codes = np.random.default_rng(13).integers(-7, 8, size=(16, 5)).astype(np.float32)
  codes[0] = 7  # every channel's absmax sits on the top code
  s = np.array([0.5, 0.25, 2.0, 0.125, 1.0], np.float32)  # powers of two: exact in float
  w = jnp.asarray(codes * s)
  np.testing.assert_array_equal(quant.fake_quant_weights(w, 4), w)


def test_weight_channels_are_independent():
  w = _x((16, 6), 14)
  w2 = w.at[:, 4].multiply(30.0)
  q1, q2 = quant.fake_quant_weights(w, 4), quant.fake_quant_weights(w2, 4)
  keep = np.arange(6) != 4
  np.testing.assert_array_equal(np.asarray(q1)[:, keep], np.asarray(q2)[:, keep])


def test_export_is_exactly_what_fake_quant_evaluates():
  """ints × scales of export() are bit-for-bit the weight the (unfrozen) forward uses."""
  w, x, b = _x((32, 12), 15), _x((7, 32), 16), _x((12,), 17)
  layer = _qlinear(w, 4, 6, bias=b)
  layer.clip[...] = jnp.linspace(0.6, 1.0, 12)
  layer.smooth = quant.SmoothScale(jnp.linspace(0.5, 2.0, 32))
  exported = layer.export()
  assert exported["codes"].dtype == jnp.int8 and exported["codes"].shape == (32, 12)
  assert exported["scales"].dtype == jnp.float32 and exported["scales"].shape == (12,)
  deq = exported["codes"].astype(jnp.float32) * exported["scales"]
  np.testing.assert_array_equal(layer.dequantized_kernel(), deq)
  xq = quant.fake_quant_activations(x / exported["smooth"], 6)
  np.testing.assert_array_equal(layer(x), xq @ deq + exported["bias"])
  # Freezing stores exactly these arrays.
  layer.freeze()
  for k, v in layer.export().items():
    np.testing.assert_array_equal(v, exported[k])


def test_freeze_refuses_codes_off_the_grid():
  layer = _qlinear(_x((8, 4), 18), 4, 6)
  with pytest.raises(ValueError, match=r"integers in \[-8, 7\]"):
    layer.freeze(jnp.full((8, 4), 8.0))
  with pytest.raises(ValueError, match="shape"):
    layer.freeze(jnp.zeros((4, 8)))
  layer.freeze(jnp.full((8, 4), -8.0))
  assert int(layer.export()["codes"].min()) == -8


def test_error_is_monotone_in_bits_with_fp_activations_too():
  w, x = _x((64, 48), 19) * 0.1, _x((32, 64), 20)
  ref = x @ w
  errors = [float(jnp.mean((_qlinear(w, b, None)(x) - ref) ** 2)) for b in (8, 6, 4, 3, 2)]
  assert errors == sorted(errors)


def test_clip_factor_is_clamped_and_sets_the_scales():
  w = _x((16, 6), 21)
  layer = _qlinear(w, 4, 6)
  layer.clip[...] = jnp.array([1.3, 1.0, 0.7, 0.05, 0.01, -1.0])
  factor = jnp.array([1.0, 1.0, 0.7, 0.05, 0.05, 0.05])
  np.testing.assert_array_equal(layer.clip_factor(), factor)
  np.testing.assert_array_equal(layer.weight_scales(), quant.weight_scales(w, 4, factor))
  np.testing.assert_array_equal(layer.weight_codes()[1], layer.weight_scales())


def test_smoothing_gets_finite_gradients():
  w, x = _x((16, 8), 23), _x((4, 16), 24)
  layer = _qlinear(w, 4, 6)
  layer.smooth = quant.SmoothScale(jnp.ones((16,)))

  def loss(model):
    return jnp.mean((model(x) - x @ w) ** 2)

  g = nnx.grad(loss, argnums=nnx.DiffState(0, quant.SmoothScale))(layer).smooth[...]
  assert np.all(np.isfinite(g)) and np.any(g != 0)
