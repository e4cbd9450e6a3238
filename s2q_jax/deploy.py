"""Quantized checkpoints: export from a calibrated model, load for inference with the kernels.

A quantized checkpoint is a folder with diffusers' `config.json` (plus an
``_s2q_jax`` entry) and one safetensors file holding, per quantized layer,
bit-packed integer codes in (N, K) order, float16 per-channel scales, bf16
bias, any channel shift, smoothing vector and Kronecker transform factors
(float16), activation clipping factor, rotation and Q-VDiT estimator branch
(float32); every other parameter is stored in bf16. Layers
quantized per timestep range (ViDiT-Q) are stored as one layer per range,
`<path>.ranges.<i>`, with the range boundaries in config.json. Calibration already uses these float16 values and
`round_fp_params` rounds the rest, so the checkpoint reproduces the evaluated
model exactly. `s2q_jax.pretrained.load_pretrained` recognises the folder and
returns a model whose quantized layers are `DeployedLinear`s running `w4a6_matmul`.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pallas_kernels import QuantizedWeight, int8_matmul, packing, reference, w4a6_matmul
from pallas_kernels.weights import dequantize_weight
from s2q_jax.fused_quant import ModulatedTokens, fuse_activation_quantization
from s2q_jax.models.loading import FORMAT_KEY, QUANTIZED_FORMAT, abstract_model
from s2q_jax.models.params import flat_params, load_flat_params
from s2q_jax.quant.apply import quantized_layers, replace_module
from s2q_jax.quant import kronecker, quantizer, token_estimator
from s2q_jax.quant.timestep_ranges import TimestepRangeLinear, ensure_step_context
from s2q_jax.quant.token_estimator import TokenAwareLinear
from s2q_jax.quant.qlinear import QuantParam

WEIGHTS_NAME = "quantized_model.safetensors"
FORMAT = QUANTIZED_FORMAT
FP_DTYPE = jnp.bfloat16  # storage of the full-precision parameters and biases
# A quantized layer's float arrays; the quantizer rounds scales and smoothing to
# float16 during calibration already, and a rotation's orthogonality needs float32.
_LAYER_DTYPES = {"scales": quantizer.STORAGE_DTYPE, "smooth": quantizer.STORAGE_DTYPE,
                 "bias": FP_DTYPE, "rotation": jnp.float32, "shift": quantizer.STORAGE_DTYPE,
                 "lowrank_a": jnp.float32, "lowrank_b": jnp.float32, "frame_scale": jnp.float32,
                 "transform_left": quantizer.STORAGE_DTYPE,
                 "transform_right": quantizer.STORAGE_DTYPE, "act_clip": jnp.float32}
_LAYER_ARRAYS = tuple(name for name in _LAYER_DTYPES if name != "scales")
# Back-ends that hold 4-bit weights as (N, K) int8 codes in device memory (2× packed, ½ bf16):
# XLA's int8 dot consumes them directly, and `auto` always has it as a candidate.
_UNPACKED_BACKENDS = ("auto", "xla_int8")


class Deployed(nnx.Variable):
  """Arrays of a deployed layer (not trainable parameters)."""


class DeployedLinear(nnx.Module):
  """A quantized linear layer as deployed: integer codes, kernels, folded transforms.

  With `backend` auto or xla_int8 the codes are held unpacked, (N, K) int8;
  with an explicit Pallas kernel they stay packed as on disk.
  """

  def __init__(self, weight: QuantizedWeight, *, bias=None, shift=None, smooth=None,
               rotation=None, transform_left=None, transform_right=None, act_clip=None,
               lowrank_a=None, lowrank_b=None, frame_scale=None, n_text: int | None = 0,
               a_bits: int | None, backend: str = "auto", dtype=jnp.float32):
    if backend in _UNPACKED_BACKENDS:  # unpack once here, not on every call
      weight = weight.unpacked()
    self.data, self.scales = Deployed(weight.data), Deployed(weight.scales)
    self.bits, self.in_features = weight.bits, weight.in_features
    arrays = dict(bias=bias, shift=shift, smooth=smooth, rotation=rotation,
                  transform_left=transform_left, transform_right=transform_right,
                  act_clip=act_clip, lowrank_a=lowrank_a, lowrank_b=lowrank_b,
                  frame_scale=frame_scale)
    for name, value in arrays.items():  # optional: None where a method did not add it
      setattr(self, name, nnx.data(None if value is None else
                                   Deployed(jnp.asarray(value, jnp.float32))))
    self.a_bits, self.n_text, self.backend, self.dtype = a_bits, n_text, backend, dtype

  @property
  def weight(self) -> QuantizedWeight:
    return QuantizedWeight(self.data[...], self.scales[...], self.bits, self.in_features)

  @property
  def fuses_input_quantization(self) -> bool:
    """Takes `ModulatedTokens` and quantizes them in their producer's fusion
    (`s2q_jax.fused_quant`); Q-VDiT's branch needs the float input, so not with one."""
    return self.a_bits is not None and self.lowrank_a is None

  def _transforms(self) -> tuple:
    return self.shift, self.smooth, self.rotation, self.transform_left

  def input_quantizer_key(self) -> tuple | None:
    """Equal keys: equal input quantization. Learned transforms or clipping are this
    layer's own (None: never shared)."""
    if any(t is not None for t in (*self._transforms(), self.act_clip)):
      return None
    return ("per-token", self.a_bits)

  def quantize_input(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, float32 per-token scales) of x (..., K): transforms, clip, absmax,
    rounding, exactly as `w4a6_matmul` quantizes."""
    if any(t is not None for t in self._transforms()):
      x = self._transform(x.astype(jnp.float32))
    clip = None if self.act_clip is None else self.act_clip[...].reshape(())
    return reference.quantize_activations(x, self.a_bits, clip)

  def __call__(self, x: jax.Array | ModulatedTokens) -> jax.Array:
    """x in the model's dtype → y in the model's dtype (`dtype`).

    No float32 copy of the activations is made unless a learned transform needs
    one (as the fake-quant layer computes it); otherwise the kernel quantizes
    x as given and its epilogue writes `dtype` directly. Given `ModulatedTokens`,
    the codes are computed from them (and shared with layers quantizing alike).
    """
    if isinstance(x, ModulatedTokens):
      if not self.fuses_input_quantization:
        return self(x.materialize())
      codes, scales = x.quantized(self.input_quantizer_key(), self.quantize_input)
      bias = None if self.bias is None else self.bias[...]
      return int8_matmul(codes, scales, self.weight, bias, out_dtype=self.dtype,
                         act_bits=self.a_bits, backend=self.backend)
    if any(t is not None for t in self._transforms()):
      x = self._transform(x.astype(jnp.float32))
    bias = None if self.bias is None else self.bias[...]
    clip = None if self.act_clip is None else self.act_clip[...]
    if self.a_bits is None:  # weight-only quantization: small layers (timestep MLP), float32
      xf = x.astype(jnp.float32)
      y = xf @ dequantize_weight(self.weight) + (0.0 if bias is None else bias)
    else:
      y = w4a6_matmul(x, self.weight, bias, act_bits=self.a_bits, act_clip=clip,
                      backend=self.backend, out_dtype=self.dtype)
    if self.lowrank_a is not None:  # Q-VDiT's estimator branch, on the quantized input
      xf = x.astype(jnp.float32)
      xq = xf if self.a_bits is None else quantizer.fake_quant_activations(xf, self.a_bits, clip)
      # Rounded to dtype before and after the sum, as `TokenAwareLinear` does.
      y = y.astype(self.dtype).astype(jnp.float32) + token_estimator.branch(
          xq, self.lowrank_a[...], self.lowrank_b[...], self.frame_scale[...], self.n_text)
    return y.astype(self.dtype)

  def _transform(self, x: jax.Array) -> jax.Array:
    """The folded input transforms, in float32 as `QuantLinear.transform_input` applies them."""
    if self.shift is not None:
      x = x - self.shift[...]
    if self.smooth is not None:
      x = x / self.smooth[...]
    if self.rotation is not None:
      x = x @ self.rotation[...]
    if self.transform_left is not None:  # two small matmuls per token
      x = kronecker.apply(x, self.transform_left[...], self.transform_right[...])
    return x


def round_fp_params(model: nnx.Module, dtype=FP_DTYPE) -> None:
  """Rounds the parameters export stores in `dtype`, so evaluation matches the checkpoint.

  That is every parameter except the kernels of quantized layers (stored as codes).
  """
  quantized = {p for p, _ in quantized_layers(model)}
  state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(QuantParam)))
  for path, var in nnx.to_flat_state(state):
    layer, _, name = ".".join(map(str, path)).rpartition(".")
    if layer not in quantized or name != "kernel":
      var.set_value(var[...].astype(dtype).astype(var.dtype))
  nnx.update(model, state)


def checkpoint_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
  """({name: array} exactly as the checkpoint stores them, {layer path: bits info})."""
  tensors, layers = {}, {}
  for path, layer in quantized_layers(model):
    arrays = {k: np.asarray(v) for k, v in layer.export().items()}
    tensors[f"{path}.codes"] = packing.pack(arrays.pop("codes").T, layer.w_bits)
    tensors.update({f"{path}.{k}": np.asarray(jnp.asarray(v).astype(_LAYER_DTYPES[k]))
                    for k, v in arrays.items()})
    layers[path] = {"w_bits": layer.w_bits, "a_bits": layer.a_bits,
                    "in_features": layer.in_features}
    if isinstance(layer, TokenAwareLinear):
      layers[path]["n_text"] = layer.n_text
  for path, value in flat_params(model).items():
    if path.rpartition(".")[0] not in layers:
      tensors[path] = np.asarray(value.astype(FP_DTYPE))
  return tensors, layers


def storage_bytes(model: nnx.Module) -> dict:
  """Array bytes of the model in bf16 and as the quantized checkpoint stores it (no headers)."""
  original = nnx.state(model, nnx.All(nnx.Param, nnx.Not(QuantParam)))
  fp_bytes = sum(2 * v.size for _, v in nnx.to_flat_state(original))
  quant_bytes = sum(t.nbytes for t in checkpoint_tensors(model)[0].values())
  return {"fp_bytes": fp_bytes, "quant_bytes": quant_bytes, "compression": fp_bytes / quant_bytes}


def export_quantized(model: nnx.Module, folder: str) -> None:
  """Writes the deployable checkpoint of a quantized model into `folder`."""
  os.makedirs(folder, exist_ok=True)
  tensors, layers = checkpoint_tensors(model)
  save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
  ranges = {p: m.boundaries for p, m in _modules_of(model, TimestepRangeLinear)}
  config = {**model.config.to_dict(),
            FORMAT_KEY: {"format": FORMAT, "layers": layers, "timestep_ranges": ranges}}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def _modules_of(model: nnx.Module, cls: type):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, cls):
      yield ".".join(map(str, path)), node


def _module_at(model: nnx.Module, dotted: str) -> nnx.Module:
  node = model
  for key in dotted.split("."):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


def weights_file_bytes(folder: str) -> int:
  """Size on disk of a quantized checkpoint's weights file (safetensors header included)."""
  return os.path.getsize(os.path.join(folder, WEIGHTS_NAME))


def load_quantized(folder: str, config, meta: dict, *, backend: str = "auto",
                   dtype=jnp.float32, fuse_act_quant: bool = True) -> nnx.Module:
  """Builds the model of a quantized checkpoint (see `s2q_jax.pretrained.load_pretrained`).

  `fuse_act_quant`: activation quantization computed inside the producer's fusion
  (`s2q_jax.fused_quant`) wherever a block supports it.
  """
  model = abstract_model(config, dtype)
  for path, boundaries in meta.get("timestep_ranges", {}).items():
    # Placeholders for each range's layer, replaced by their DeployedLinear below.
    placeholder = _module_at(model, path)
    replace_module(model, path, TimestepRangeLinear([placeholder] * (len(boundaries) + 1),
                                                    boundaries, ensure_step_context(model)))
  with safe_open(os.path.join(folder, WEIGHTS_NAME), framework="numpy") as f:
    for path, info in meta["layers"].items():
      k, bits = info["in_features"], info["w_bits"]
      codes = packing.unpack(f.get_tensor(f"{path}.codes"), bits, k)  # (N, K)
      weight = QuantizedWeight.from_codes(
          codes.T, f.get_tensor(f"{path}.scales").astype(np.float32), bits)
      extras = {name: f.get_tensor(f"{path}.{name}").astype(np.float32)
                for name in _LAYER_ARRAYS if f"{path}.{name}" in f.keys()}
      replace_module(model, path, DeployedLinear(weight, a_bits=info["a_bits"], backend=backend,
                                                 n_text=info.get("n_text", 0), dtype=dtype,
                                                 **extras))
    rest = {key: f.get_tensor(key) for key in f.keys() if key.rpartition(".")[0] not in
            meta["layers"]}
  load_flat_params(model, rest)
  if fuse_act_quant:
    fuse_activation_quantization(model)
  return model
