"""Loading the T5 text encoder from a transformers folder (a pipeline's `text_encoder/`).

Reads `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`) without torch. Every key and shape is checked
before any tensor is read, and tensors are read one at a time while the
model is filled, so peak memory stays near one copy of the weights.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.checkpoint_files import CheckpointError, TensorSource, pipeline_component
from s2q_jax.models.loading import check_finite_weights
from s2q_jax.models.params import load_flat_params, param_shapes
from s2q_jax.models.t5 import T5Encoder
from s2q_jax.models.t5_config import T5EncoderConfig

WEIGHTS_NAME = "model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"
SUPPORTED_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))

# T5EncoderModel ties the encoder's input embedding to `shared`; checkpoints store
# either name (transformers reads `shared` when both are present).
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")
# The decoder half of a T5ForConditionalGeneration checkpoint, which T5EncoderModel skips too.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")
# (NNX parameter path, transformers key) patterns; kernels are transposed Linear weights.
_KEYMAP = (
    (r"relative_attention_bias",
     "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.attn_norm\.scale", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|o)\.kernel",
     r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.ff_norm\.scale", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ff\.(wi|wi_0|wi_1|wo)\.kernel",
     r"encoder.block.\1.layer.1.DenseReluDense.\2.weight"),
    (r"final_norm\.scale", "encoder.final_layer_norm.weight"),
)


def transformers_key(path: str) -> str:
  """The transformers state-dict key of an NNX parameter path of `T5Encoder`."""
  if path == "embedding":
    return _EMBEDDING_KEYS[0]
  for pattern, key in _KEYMAP:
    if re.fullmatch(pattern, path):
      return re.sub(f"^{pattern}$", key, path)
  raise KeyError(f"no transformers key for T5Encoder parameter {path}")


def _read_config(folder: str) -> T5EncoderConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder} has no config.json: pass the {TEXT_ENCODER_DIR}/ folder of a "
                          "diffusers pipeline (a transformers T5 encoder checkpoint)")
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  return T5EncoderConfig.from_dict(raw, origin=path)


def _abstract(config: T5EncoderConfig, dtype) -> T5Encoder:
  return nnx.eval_shape(lambda: T5Encoder(config, dtype=dtype, rngs=nnx.Rngs(0)))


class _TransformersParams(Mapping):
  """{NNX path: array} over a transformers T5 checkpoint, validated up front, read on access."""

  def __init__(self, folder: str, config: T5EncoderConfig):
    self._source = source = TensorSource(folder, weights_name=WEIGHTS_NAME)
    self._shapes = {p: s for p, (s, _) in param_shapes(_abstract(config, jnp.float32)).items()}
    present = set(source.keys())
    self._keys = {path: transformers_key(path) for path in self._shapes}
    embedding = next((k for k in _EMBEDDING_KEYS if k in present), _EMBEDDING_KEYS[0])
    self._keys["embedding"] = embedding
    wanted = set(self._keys.values())
    ignored = {k for k in present if k.startswith(_IGNORED_PREFIXES) or k in _EMBEDDING_KEYS}
    problems = []
    if missing := sorted(wanted - present):
      problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected := sorted(present - wanted - ignored):
      problems.append(f"unexpected keys: {', '.join(unexpected)}")
    misshaped = [f"{key} {source.shape(key)} (expected {expected})"
                 for path, key in sorted(self._keys.items()) if key in present
                 if source.shape(key) != (expected := self._stored_shape(path))]
    if misshaped:
      problems.append(f"mis-shaped keys: {', '.join(misshaped)}")
    if problems:
      raise CheckpointError(f"{folder} does not match its config.json:\n  " + "\n  ".join(problems))
    # The smallest tensor tells the stored dtype without reading a large one.
    self.stored_dtype = source.get(self._keys["final_norm.scale"]).dtype

  def _stored_shape(self, path: str) -> tuple[int, ...]:
    shape = self._shapes[path]
    return tuple(reversed(shape)) if path.endswith(".kernel") else tuple(shape)

  def __getitem__(self, path: str) -> np.ndarray:
    tensor = self._source.get(self._keys[path])
    return tensor.T if path.endswith(".kernel") else tensor

  def __iter__(self) -> Iterator[str]:
    return iter(self._shapes)

  def __len__(self) -> int:
    return len(self._shapes)


def _resolve_dtype(dtype, stored: np.dtype, folder: str) -> np.dtype:
  if dtype is None:
    if stored == np.float16:
      # T5 activations overflow float16 (transformers clamps them and keeps `wo` in
      # float32 for this); the computation here has no such guards.
      raise CheckpointError(f"{folder} stores float16 weights, which overflow in T5: pass "
                            "dtype='bfloat16' or dtype='float32' to load_text_encoder")
    dtype = stored
  try:
    dtype = np.dtype(dtype)
  except TypeError:
    dtype = None
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r} for the text encoder: use None (the "
                     "checkpoint's), 'float32' or 'bfloat16'")
  return dtype


def load_text_encoder(folder: str | os.PathLike, dtype=None) -> T5Encoder:
  """The T5 encoder of a transformers folder, or of a diffusers pipeline's `text_encoder/`.

  `dtype` None keeps the checkpoint's dtype (float32 or bfloat16); 'float32'
  or 'bfloat16' casts the weights. Raises `CheckpointError` naming every
  missing, unexpected or mis-shaped key, and `UnsupportedConfigError` for a
  configuration this encoder does not compute.
  """
  folder = pipeline_component(folder, TEXT_ENCODER_DIR)
  config = _read_config(folder)
  params = _TransformersParams(folder, config)
  dtype = _resolve_dtype(dtype, params.stored_dtype, folder)
  model = _abstract(config, dtype)
  load_flat_params(model, params)
  check_finite_weights(model, folder)
  return model
