"""`QuantLinear`: a drop-in, fake-quantized replacement for `models.layers.Linear`.

It computes, for an input x and full-precision kernel W (K, N):

    x̃ = ((x / s) R)                    smoothing s (K,), rotation R (K, K), both optional
    Ŵ = Q_w(Rᵀ diag(s) W; clip)         per-output-channel codes × scales
    y = Q_a(x̃) Ŵ + b                    Q_a: dynamic per-token, a_bits

Since x W = ((x / s) R)(Rᵀ diag(s) W), the transforms change only what is
quantized. Everything a method learns is a Variable of its own type
(`WeightClip`, `SmoothScale`, `Rotation`), so optimisers select parameter
groups by type and the model's code never changes. `freeze()` stores the
integer codes and scales that deployment will use, after which evaluation
runs exactly the deployed arithmetic. Methods that need more (e.g. a
low-rank error branch) subclass this and override `__call__` or
`effective_kernel`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import reference
from s2q_jax.models.layers import Linear
from s2q_jax.quant import quantizer


class QuantParam(nnx.Param):
  """Base type of every parameter quantization adds to a layer."""


class WeightClip(QuantParam):
  """Per-output-channel fraction of |W|max mapped to the top code; 1 = min-max (RTN)."""


class SmoothScale(QuantParam):
  """Per-input-channel scale s: activations are divided by s, weight rows multiplied by it."""


class Rotation(QuantParam):
  """Orthogonal (K, K) matrix applied to activations, its transpose folded into the weights."""


class Codes(nnx.Variable):
  """Frozen integer weight codes (K, N) int8 and their (N,) scales: what deployment stores."""


MIN_CLIP = 0.05


class QuantLinear(nnx.Module):
  """Fake-quantized linear layer; `w_bits` per output channel, `a_bits` per token (None: FP)."""

  def __init__(self, linear: Linear, *, w_bits: int, a_bits: int | None, path: str = ""):
    self.path = path
    self.w_bits = quantizer.check_bits(w_bits, f"{path} w_bits")
    self.a_bits = None if a_bits is None else quantizer.check_bits(a_bits, f"{path} a_bits")
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.kernel = linear.kernel
    self.bias = linear.bias
    self.clip = WeightClip(jnp.ones((self.out_features,), jnp.float32))
    # Optional state, declared as data so methods can set it later.
    self.smooth: SmoothScale | None = nnx.data(None)
    self.rotation: Rotation | None = nnx.data(None)
    self.codes: Codes | None = nnx.data(None)
    self.scales: Codes | None = nnx.data(None)

  # -- what gets quantized -------------------------------------------------
  def transform_input(self, x: jax.Array) -> jax.Array:
    if self.smooth is not None:
      x = x / self.smooth[...].astype(x.dtype)
    if self.rotation is not None:
      x = jnp.matmul(x, self.rotation[...].astype(x.dtype))
    return x

  def effective_kernel(self) -> jax.Array:
    """Rᵀ diag(s) W in float32: the full-precision weight that is quantized."""
    w = self.kernel[...].astype(jnp.float32)
    if self.smooth is not None:
      w = w * self.smooth[...].astype(jnp.float32)[:, None]
    if self.rotation is not None:
      w = self.rotation[...].astype(jnp.float32).T @ w
    return w

  def weight_codes(self) -> tuple[jax.Array, jax.Array]:
    """(codes (K, N) as float, scales (N,)): frozen ones if present, else from the current state."""
    if self.codes is not None:
      return self.codes[...].astype(jnp.float32), self.scales[...]
    w = self.effective_kernel()
    clip = jnp.clip(self.clip[...], MIN_CLIP, 1.0)
    scales = quantizer.weight_scales(w, self.w_bits, clip)
    return quantizer.quantize(w, scales, self.w_bits), scales

  def dequantized_kernel(self) -> jax.Array:
    codes, scales = self.weight_codes()
    return codes * scales

  # -- forward -------------------------------------------------------------
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.kernel.dtype
    xt = self.transform_input(x.astype(jnp.float32))
    if self.codes is not None and self.a_bits is not None:
      return self._deployed_arithmetic(xt).astype(dtype)
    if self.a_bits is not None:
      xt = quantizer.fake_quant_activations(xt, self.a_bits)
    y = jnp.matmul(xt, self.dequantized_kernel(), preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(dtype)

  def _deployed_arithmetic(self, xt: jax.Array) -> jax.Array:
    """Frozen layers compute exactly what the deployed kernels compute: int8 codes, int32 sums."""
    x2 = xt.reshape(-1, xt.shape[-1])
    x_codes, x_scales = reference.quantize_activations(x2, self.a_bits)
    bias = None if self.bias is None else self.bias[...]
    y = reference.int_matmul(x_codes, x_scales, self.codes[...].T, self.scales[...], bias,
                             jnp.float32)
    return y.reshape(*xt.shape[:-1], self.out_features)

  # -- deployment ----------------------------------------------------------
  def freeze(self, codes: jax.Array | None = None) -> None:
    """Stores integer codes and scales; later calls use exactly these.

    `codes` (K, N) replaces round-to-nearest (e.g. GPTQ's, for the current scales).
    """
    rtn_codes, scales = self.weight_codes()
    codes = rtn_codes if codes is None else codes
    self.codes = Codes(codes.astype(jnp.int8))
    self.scales = Codes(scales.astype(jnp.float32))

  def export(self) -> dict[str, jax.Array]:
    """The arrays a deployed layer needs: codes (K, N) int8, scales (N,), bias, transforms."""
    codes, scales = self.weight_codes()
    out = {"codes": codes.astype(jnp.int8), "scales": scales.astype(jnp.float32)}
    if self.bias is not None:
      out["bias"] = self.bias[...]
    if self.smooth is not None:
      out["smooth"] = self.smooth[...]
    if self.rotation is not None:
      out["rotation"] = self.rotation[...]
    return out
