"""`QuantLinear`: a drop-in, fake-quantized replacement for `models.layers.Linear`.

It computes, for an input x and full-precision kernel W (K, N):

    x̃ = ((x - z) / s) R P               shift z (K,), smoothing s (K,), rotation R (K, K),
                                        Kronecker transform P = P₁ ⊗ P₂: each optional
    Ŵ = Q_w(P⁻¹ Rᵀ diag(s) W; c_w)      per-output-channel codes × scales, clipping c_w
    y = Q_a(x̃; c_a) Ŵ + (b + z W)       Q_a: dynamic per-token, a_bits, clipping c_a

Since x W = (((x - z) / s) R P)(P⁻¹ Rᵀ diag(s) W) + z W, the transforms change
only what is quantized; z W folds into the stored bias. Everything a method
learns is a Variable of its own type (`WeightClip`, `ActClip`, `SmoothScale`,
`Rotation`, `KroneckerFactor`), so optimisers select parameter groups by type
and the model's code never changes. A type with `bounds` must be projected
back into them after every optimiser step (`project`). `freeze()` stores the
integer codes and scales that deployment will use, after which evaluation
runs exactly the deployed arithmetic.

Adding a method's own state: subclass `QuantLinear`, create the new
parameters in `__init__` as a new `QuantParam` subclass (so optimisers pick
them by type, s2q checkpoints save them with `nnx.Any(QuantParam, Codes)`
and storage accounting does not count them as model weights), override
`transform_input` / `effective_kernel` for anything that folds into the
weights, or `__call__` for an extra branch (e.g. Q-VDiT's rank-1 term), and
pass the class as `quantize_model(..., layer_cls=MyQuantLinear)`. An extra
branch that does not fold must also be exported, or deployment drops it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import reference
from s2q_jax.models.layers import Linear
from s2q_jax.quant import kronecker, quantizer


class QuantParam(nnx.Param):
  """Base type of every parameter quantization adds to a layer.

  `bounds` (lo, hi): the range the value is used in; optimisers project it back
  there after every step (see `project`).
  """
  bounds: tuple[float, float] | None = None


class WeightClip(QuantParam):
  """Per-output-channel fraction of |W|max mapped to the top code; 1 = min-max (RTN).

  The stored value is the factor itself (1 = exact RTN, no logits) and is used
  clamped to [MIN_CLIP, 1]. A clamp has no gradient outside its range, so an
  optimiser must project the value back after each step
  (``jnp.clip(c, MIN_CLIP, 1.0)``); otherwise one step past 1, where every factor
  starts, freezes that channel at min-max. The projection is done there, not by a
  sign-dependent gradient here, because gradients must stay linear in the loss
  (sharded sums and pmean must equal the full-batch gradient).
  """
  bounds = (0.05, 1.0)


class ActClip(QuantParam):
  """Fraction of each token's absmax mapped to the top activation code, one per layer.

  Used clamped to `bounds`; like `WeightClip`, projected there after each step.
  """
  bounds = (0.3, 1.0)


class KroneckerFactor(QuantParam):
  """P₁ or P₂ of a layer's learnable input transform P = P₁ ⊗ P₂ (see `quant.kronecker`)."""


class SmoothScale(QuantParam):
  """Per-input-channel scale s: activations are divided by s, weight rows multiplied by it."""


class Rotation(QuantParam):
  """Orthogonal (K, K) matrix applied to activations, its transpose folded into the weights."""


class ChannelShift(QuantParam):
  """Per-input-channel offset z subtracted from activations; z W folds into the bias."""


class Codes(nnx.Variable):
  """Frozen integer weight codes (K, N) int8 and their (N,) scales: what deployment stores."""


MIN_CLIP = WeightClip.bounds[0]


def project(value: jax.Array, variable_type: type) -> jax.Array:
  """`value` clipped into `variable_type.bounds` (unchanged for types without bounds)."""
  bounds = getattr(variable_type, "bounds", None)
  return value if bounds is None else jnp.clip(value, *bounds)


class QuantLinear(nnx.Module):
  """Fake-quantized linear layer; `w_bits` per output channel, `a_bits` per token (None: FP)."""

  def __init__(self, linear: Linear, *, w_bits: int, a_bits: int | None, path: str = ""):
    # `path` only names the layer in errors here. Not stored: a per-layer string would make
    # every block's graph distinct, and so recompile each jitted function once per block.
    self.w_bits = quantizer.check_bits(w_bits, f"{path} w_bits")
    self.a_bits = None if a_bits is None else quantizer.check_bits(a_bits, f"{path} a_bits")
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.kernel = linear.kernel
    self.bias = linear.bias
    self.clip = WeightClip(jnp.ones((self.out_features,), jnp.float32))
    # Optional state, declared as data so methods can set it later.
    self.shift: ChannelShift | None = nnx.data(None)
    self.smooth: SmoothScale | None = nnx.data(None)
    self.rotation: Rotation | None = nnx.data(None)
    self.act_clip: ActClip | None = nnx.data(None)
    self.transform_left: KroneckerFactor | None = nnx.data(None)
    self.transform_right: KroneckerFactor | None = nnx.data(None)
    self.codes: Codes | None = nnx.data(None)
    self.scales: Codes | None = nnx.data(None)

  # -- what gets quantized -------------------------------------------------
  def shift_vector(self) -> jax.Array | None:
    """(K,) channel shift as deployed (float16 values), or None."""
    if self.shift is None:
      return None
    return quantizer.round_to_storage(self.shift[...].astype(jnp.float32))

  def smooth_vector(self) -> jax.Array | None:
    """(K,) smoothing scales as deployed (bf16 values), or None."""
    if self.smooth is None:
      return None
    return quantizer.round_to_storage(self.smooth[...].astype(jnp.float32))

  def transform_factors(self) -> tuple[jax.Array, jax.Array] | None:
    """(P₁, P₂) as deployed (float16 values), or None."""
    if self.transform_left is None:
      return None
    return tuple(quantizer.round_to_storage(v[...].astype(jnp.float32))
                 for v in (self.transform_left, self.transform_right))

  def activation_clip(self) -> jax.Array | None:
    """() activation clipping factor in `ActClip.bounds`, or None (min-max)."""
    return None if self.act_clip is None else project(self.act_clip[...], ActClip)

  def transform_input(self, x: jax.Array) -> jax.Array:
    if self.shift is not None:
      x = x - self.shift_vector().astype(x.dtype)
    if self.smooth is not None:
      x = x / self.smooth_vector().astype(x.dtype)
    if self.rotation is not None:
      x = jnp.matmul(x, self.rotation[...].astype(x.dtype))
    if self.transform_left is not None:
      x = kronecker.apply(x, *self.transform_factors())
    return x

  def quantize_input(self, xt: jax.Array) -> jax.Array:
    """Fake-quantized transformed input Q_a(x̃; c_a) (x̃ itself for float activations)."""
    if self.a_bits is None:
      return xt
    return quantizer.fake_quant_activations(xt, self.a_bits, self.activation_clip())

  def effective_kernel(self) -> jax.Array:
    """P⁻¹ Rᵀ diag(s) W in float32: the full-precision weight that is quantized."""
    w = self.kernel[...].astype(jnp.float32)
    if self.smooth is not None:
      w = w * self.smooth_vector()[:, None]
    if self.rotation is not None:
      w = self.rotation[...].astype(jnp.float32).T @ w
    if self.transform_left is not None:
      w = kronecker.fold_inverse(w, *self.transform_factors())
    return w

  def effective_bias(self) -> jax.Array | None:
    """b + z W (float32): what the deployed layer adds; with a shift, rounded as it is stored."""
    if self.shift is None:
      return None if self.bias is None else self.bias[...].astype(jnp.float32)
    b = self.shift_vector() @ self.kernel[...].astype(jnp.float32)
    if self.bias is not None:
      b = b + self.bias[...].astype(jnp.float32)
    return b.astype(jnp.bfloat16).astype(jnp.float32)

  def clip_factor(self) -> jax.Array:
    """(N,) clipping factors in [MIN_CLIP, 1] that the weight scales use."""
    return project(self.clip[...], WeightClip)

  def weight_scales(self) -> jax.Array:
    """(N,) scales of the current (unfrozen) state: those GPTQ must round for."""
    return quantizer.weight_scales(self.effective_kernel(), self.w_bits, self.clip_factor())

  def weight_codes(self) -> tuple[jax.Array, jax.Array]:
    """(codes (K, N) as float, scales (N,)): frozen ones if present, else from the current state."""
    if self.codes is not None:
      return self.codes[...].astype(jnp.float32), self.scales[...]
    w = self.effective_kernel()
    scales = quantizer.weight_scales(w, self.w_bits, self.clip_factor())
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
    xt = self.quantize_input(xt)
    y = jnp.matmul(xt, self.dequantized_kernel(), preferred_element_type=jnp.float32)
    bias = self.effective_bias()
    return (y if bias is None else y + bias).astype(dtype)

  def _deployed_arithmetic(self, xt: jax.Array) -> jax.Array:
    """Frozen layers compute exactly what the deployed kernels compute: int8 codes, int32 sums."""
    x2 = xt.reshape(-1, xt.shape[-1])
    x_codes, x_scales = reference.quantize_activations(x2, self.a_bits, self.activation_clip())
    bias = self.effective_bias()
    y = reference.int_matmul(x_codes, x_scales, self.codes[...].T, self.scales[...], bias,
                             jnp.float32)
    return y.reshape(*xt.shape[:-1], self.out_features)

  # -- deployment ----------------------------------------------------------
  def freeze(self, codes: jax.Array | None = None) -> None:
    """Stores integer codes and scales; later calls use exactly these.

    `codes` (K, N) replaces round-to-nearest (e.g. GPTQ's, for the current scales).
    """
    rtn_codes, scales = self.weight_codes()
    if codes is None:
      codes = rtn_codes
    else:
      self._check_codes(codes)
    self.codes = Codes(codes.astype(jnp.int8))
    self.scales = Codes(scales.astype(jnp.float32))

  def _check_codes(self, codes: jax.Array) -> None:
    # Casting to int8 would silently wrap codes that are off the b-bit grid.
    if codes.shape != (self.in_features, self.out_features):
      raise ValueError(f"codes of shape {codes.shape}, expected "
                       f"{(self.in_features, self.out_features)} (K, N)")
    if isinstance(codes, jax.core.Tracer):
      return
    lo, hi = quantizer.qrange(self.w_bits)
    c = np.asarray(codes, np.float64)
    if not (np.all(c == np.round(c)) and c.min() >= lo and c.max() <= hi):
      raise ValueError(f"codes must be integers in [{lo}, {hi}] for "
                       f"{self.w_bits}-bit weights (got [{c.min()}, {c.max()}])")

  def export(self) -> dict[str, jax.Array]:
    """The arrays a deployed layer needs: codes (K, N) int8, scales (N,), bias (z W folded in),
    transforms."""
    codes, scales = self.weight_codes()
    out = {"codes": codes.astype(jnp.int8), "scales": scales.astype(jnp.float32)}
    if self.effective_bias() is not None:
      out["bias"] = self.effective_bias()
    if self.shift is not None:
      out["shift"] = self.shift_vector()
    if self.smooth is not None:
      out["smooth"] = self.smooth_vector()
    if self.rotation is not None:
      out["rotation"] = self.rotation[...]
    if self.transform_left is not None:
      out["transform_left"], out["transform_right"] = self.transform_factors()
    if self.act_clip is not None:
      out["act_clip"] = self.activation_clip().reshape(1)
    return out
