"""Activation quantization fused into its producer, for deployed (integer) models.

Every deployed W4A6 layer quantizes its input per token. Done as a pass of its
own, that reads the full-size bf16 activations back and writes int8 codes,
≈ 3·M·K bytes, 30–120 µs per layer on an H100 at 17,776 tokens (DESIGN.md §6),
on top of the producer writing those activations in the first place. In a
video DiT block the inputs of q, k, v and FF1 are the output of the block's
LayerNorm + adaptive modulation, and FF2's is the GELU of FF1's output. Here
the codes are written by the fusion that computes those values, so the int8
codes do not come from a stored copy of the modulated activations:

- `ModulatedTokens` is the joint [text; video] sequence after norm +
  modulation, held as one float32 expression per part (text and video have
  their own shift and scale) instead of the concatenated array. A deployed
  layer given it (`DeployedLinear.__call__`) applies its input transform and
  clipping, takes each token's absmax and writes the int8 codes part by part,
  then concatenates the codes: XLA computes the modulation inside the fusion
  that writes them. Nothing is stored, so nothing is rounded to bf16 first:
  the codes quantize the float32 value (as calibration's float32 fake
  quantization does), not its bf16 rounding.
- Layers whose input quantizers are the same (same bits, no learned
  transform, smoothing or clip: q, k and v of an RTN or GPTQ model) share one
  set of codes; a layer with learned ones (S²Q's Kronecker transform and
  act_clip) quantizes its own transformed input.
- FF2's input, GELU(FF1's output), is left as it is: XLA computes FF1's
  epilogue and the GELU in one fusion and stores the result once in bf16,
  which the absmax and the codes then read. Not storing it would mean
  computing the GELU twice from the int32 accumulator (XLA does not duplicate
  a tanh), and reading the 4-byte accumulator twice moves as many bytes as
  writing and reading bf16; the real saving needs FF1's kernel to write FF2's
  codes, after a per-token absmax across all of its N tiles (not done).

`fuse_activation_quantization(model)` installs this dataflow in the blocks that
support it (every layer reading the modulated tokens quantizes its input);
`s2q_jax.pretrained.load_pretrained` of a quantized checkpoint does so by default. What stays:
each token's absmax is a row reduction, so the values are computed twice (once
for the absmax, once for the codes); XLA on CPU stores the reduction's input
(its reductions do not fuse with producers), XLA on GPU can fuse the
modulation into the reduction as well (not yet checked on a GPU). A learned
Kronecker transform is a matmul, whose output XLA stores before the codes are
taken.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from s2q_jax.models.cogvideox import CogVideoXBlock, LayerNormZero

QuantizeFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


class ModulatedTokens:
  """[text; video] tokens after LayerNorm + modulation, as float32 parts not yet joined.

  Lives only while a forward is traced. `quantized` returns a layer's int8 codes
  and scales, computed once per distinct input quantizer; `materialize` the
  joined array in the model's dtype, exactly what the unfused block computes,
  for any consumer that is not quantized.
  """

  def __init__(self, parts: list[jax.Array], dtype, materialized: Callable[[], jax.Array]):
    self.parts, self.dtype, self._materialized = parts, dtype, materialized
    self._codes: dict = {}

  @property
  def shape(self) -> tuple[int, ...]:
    b, _, d = self.parts[0].shape
    return (b, sum(p.shape[1] for p in self.parts), d)

  def materialize(self) -> jax.Array:
    return self._materialized()

  def quantized(self, key, quantize: QuantizeFn) -> tuple[jax.Array, jax.Array]:
    """(codes (B, S, K) int8, scales (B, S, 1) float32) of `quantize` applied to each part.

    Per-token quantization never mixes tokens, so quantizing the parts and joining
    the codes equals quantizing the joined tokens. `key`: equal keys, equal
    quantizers (their codes are computed once); None: never shared.
    """
    if key is not None and key in self._codes:
      return self._codes[key]
    codes, scales = zip(*(quantize(p) for p in self.parts))
    out = jnp.concatenate(codes, axis=1), jnp.concatenate(scales, axis=1)
    if key is not None:
      self._codes[key] = out
    return out


def modulate(norm: LayerNormZero, video: jax.Array, text: jax.Array,
             temb: jax.Array) -> tuple[ModulatedTokens, jax.Array, jax.Array]:
  """`LayerNormZero` for a joint-sequence consumer: (tokens, video gate, text gate).

  The same parameters and formula as `LayerNormZero.__call__`; the norm and the
  modulation run in float32 and are left to the consumers' fusions.
  """
  shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(
      norm.linear(jax.nn.silu(temb))[:, None, :], 6, axis=-1)
  f32 = lambda a: a.astype(jnp.float32)
  parts = [norm.norm(f32(x)) * (1 + f32(s)) + f32(b)
           for x, s, b in ((text, t_scale, t_shift), (video, scale, shift))]

  def materialized():  # the unfused block's values, rounding included
    n_video, n_text, _, _ = norm(video, text, temb)
    return jnp.concatenate([n_text, n_video], axis=1)
  return ModulatedTokens(parts, video.dtype, materialized), gate, t_gate


class FusedCogVideoXBlock(CogVideoXBlock):
  """`CogVideoXBlock` whose q/k/v and FF1 codes come out of the norm + modulation.

  Holds the original block's modules under the same names, so parameter paths
  and checkpoints are unchanged; only the dataflow differs (see module doc).
  """

  def __init__(self, block: CogVideoXBlock):  # pylint: disable=super-init-not-called
    self.norm1, self.attn1, self.norm2, self.ff = block.norm1, block.attn1, block.norm2, block.ff

  def __call__(self, video, text, temb, rotary=None):
    text_len = text.shape[1]
    tokens, gate, t_gate = modulate(self.norm1, video, text, temb)
    attn = self.attn1(tokens, text_len, rotary)
    video = video + gate * attn[:, text_len:]
    text = text + t_gate * attn[:, :text_len]
    tokens, gate, t_gate = modulate(self.norm2, video, text, temb)
    ff = self.ff(tokens)
    return video + gate * ff[:, text_len:], text + t_gate * ff[:, :text_len]


def takes_quantized_tokens(layer) -> bool:
  """Whether `layer` quantizes a `ModulatedTokens` input itself (else it would materialize it)."""
  return bool(getattr(layer, "fuses_input_quantization", False))


def fuse_activation_quantization(model: nnx.Module) -> int:
  """Gives every CogVideoX block whose modulated-token consumers all quantize their input
  the fused dataflow, in place; returns how many blocks were changed."""
  blocks = getattr(model, "transformer_blocks", None)
  changed = 0
  for i, block in enumerate(blocks if blocks is not None else []):
    if type(block) is not CogVideoXBlock:  # pylint: disable=unidiomatic-typecheck
      continue
    consumers = (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.ff.proj_in)
    if all(takes_quantized_tokens(layer) for layer in consumers):
      blocks[i] = FusedCogVideoXBlock(block)
      changed += 1
  return changed
