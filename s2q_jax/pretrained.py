"""Loading any model folder s2q-jax reads or writes: diffusers, converted or quantized.

`s2q_jax.models.load_pretrained` loads diffusers folders and converted
checkpoints; quantized checkpoints need `s2q_jax.deploy`, which depends on
`s2q_jax.models`, so the loader of all three lives above both.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from s2q_jax import deploy
from s2q_jax.models import loading


def load_pretrained(path: str, dtype=None, *, allow_pickle: bool = False,
                    backend: str = "auto", fuse_act_quant: bool = True) -> nnx.Module:
  """Loads a diffusers folder, a converted checkpoint or a quantized checkpoint.

  The model family (CogVideoX, Wan, HunyuanVideo) follows the config's `_class_name`.

  `dtype` None keeps the stored dtype (float32 compute for quantized
  checkpoints); otherwise parameters are cast to it. `backend` selects the
  matmul kernels of a quantized checkpoint (see `pallas_kernels.BACKENDS`), and
  `fuse_act_quant` whether its activation quantization is fused into the
  producers (`s2q_jax.fused_quant`).
  """
  path = os.fspath(path)
  config, meta = loading.read_config_and_meta(path)
  if loading.is_quantized(meta):
    model = deploy.load_quantized(path, config, meta, backend=backend, dtype=dtype or jnp.float32,
                                  fuse_act_quant=fuse_act_quant)
  else:
    model = loading.load_full_precision(path, config, meta, dtype, allow_pickle=allow_pickle)
  loading.check_finite_weights(model, path)
  return model
