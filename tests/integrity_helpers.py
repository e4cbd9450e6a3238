"""Tiny in-process job configs and damaged copies of the embedded model, for the integrity tests."""
import os
import shutil
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from conversion.checkpoint_files import WEIGHTS_NAME
from s2q_jax import embedded, pipeline
from s2q_jax.job_config import base_config


def tiny_config(workdir, method: str = "rtn", **flat):
  """The main job at test size; `flat` maps dotted keys ("quant.w_bits") to values."""
  cfg = base_config(4, 6, method)
  cfg.workdir = str(workdir)
  cfg.compilation_cache = ""  # keep conftest's cache directory
  cfg.eval.num_videos, cfg.sampler.num_steps = 2, 2
  cfg.calib.num_prompts, cfg.calib.num_samples = 1, 2
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  # Resolved as the job resolves it, for tests that call the job's parts directly.
  return pipeline.resolve(cfg)[0]


def model_copy(dst, edit_weights: Callable[[dict], None] | None = None) -> str:
  """A copy of the embedded model folder, its diffusers tensors passed through `edit_weights`."""
  dst = str(dst)
  shutil.copytree(embedded.path(), dst)
  if edit_weights:
    path = os.path.join(dst, WEIGHTS_NAME)
    tensors = {k: np.array(v) for k, v in load_file(path).items()}
    edit_weights(tensors)
    save_file(tensors, path)
  return dst
