"""GPTQ against round-to-nearest on correlated inputs, and its exact reduction to RTN."""
import jax.numpy as jnp
import numpy as np

from s2q_jax.calibration.gptq import accumulate_hessian, gptq_quantize


def _setup(seed=0, k=32, n=16, correlated=True):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((512, k))
  x = z @ (rng.standard_normal((k, k)) * np.linspace(0.1, 3, k)) if correlated else z
  w = rng.standard_normal((k, n)) * 0.1
  scales = np.abs(w).max(0) / 7
  return x.astype(np.float32), w.astype(np.float32), scales.astype(np.float32)


def _rtn(w, scales):
  return np.clip(np.round(w / scales), -8, 7)


def test_gptq_beats_rtn_on_correlated_inputs():
  x, w, scales = _setup()
  h = accumulate_hessian(None, jnp.asarray(x))
  np.testing.assert_allclose(h, x.T @ x, rtol=1e-4, atol=1e-2)
  codes = np.asarray(gptq_quantize(jnp.asarray(w), h, jnp.asarray(scales), bits=4))
  assert codes.min() >= -8 and codes.max() <= 7 and codes.dtype == np.int8
  err_gptq = np.sum((x @ w - x @ (codes * scales)) ** 2)
  err_rtn = np.sum((x @ w - x @ (_rtn(w, scales) * scales)) ** 2)
  assert err_gptq < 0.8 * err_rtn


def test_diagonal_hessian_reduces_to_rtn():
  _, w, scales = _setup(1)
  h = jnp.diag(jnp.linspace(1.0, 4.0, w.shape[0]))
  codes = gptq_quantize(jnp.asarray(w), h, jnp.asarray(scales), bits=4, percdamp=0.0)
  np.testing.assert_array_equal(codes, _rtn(w, scales))


def test_dead_input_channels():
  x, w, scales = _setup(2)
  x[:, 3] = 0.0
  h = accumulate_hessian(None, jnp.asarray(x))
  codes = np.asarray(gptq_quantize(jnp.asarray(w), h, jnp.asarray(scales), bits=4))
  assert np.all(np.isfinite(codes)) and np.all(codes[3] == 0)
