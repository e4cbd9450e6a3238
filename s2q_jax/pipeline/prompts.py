"""Prompt files and their T5 embeddings: the conditions of a pipeline's videos.

Embeddings are computed once and cached in the workdir, keyed on the text
encoder and tokenizer files, the prompts, the sequence length and the
dtype; the text encoder is loaded only on a cache miss and leaves memory
before anything else runs (T5-XXL is 9.5 GB in bf16).
"""
from __future__ import annotations

import gc
import importlib.resources
import os
from typing import NamedTuple, Sequence

import numpy as np

from s2q_jax import fingerprint, multihost, outputs
from s2q_jax.errors import UserError
from s2q_jax.models import encode_prompts, load_text_encoder, load_tokenizer
from s2q_jax.pipeline.folder import Pipeline

# The null prompt of classifier-free guidance: diffusers' default negative prompt.
NULL_PROMPT = ""
CACHE_NAME = "prompt_embeddings.npz"


def default_prompt_file(kind: str) -> str:
  """The shipped prompt file: 'eval' (20 prompts) or 'calibration' (10 others)."""
  return str(importlib.resources.files("s2q_jax") / "assets" / "prompts" / f"{kind}.txt")


def read_prompts(path: str, count: int, setting: str, count_setting: str) -> list[str]:
  """The first `count` prompts of a text file holding one per line.

  Blank lines and lines starting with '#' are skipped. Fewer prompts than
  `count` is an error rather than a cycle: repeated prompts would give
  near-duplicate videos that look like more evidence than they are.
  """
  if not os.path.isfile(path):
    raise UserError(f"{setting}={path!r}: no such file; give a text file with one prompt per "
                    "line, or '' for the shipped prompts")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise UserError(f"{setting}={path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
                    ) from None
  except OSError as e:
    raise outputs.io_error(path, e, "read") from None
  prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
  if not prompts:
    raise UserError(f"{setting}={path!r} holds no prompts: write one prompt per line")
  if len(prompts) < count:
    raise UserError(f"{setting}={path!r} holds {len(prompts)} prompts but {count_setting}="
                    f"{count} asks for {count}: add prompts or lower {count_setting}")
  return prompts[:count]


def prompt_sets(cfg, calibrating: bool) -> dict[str, list[str]]:
  """{'eval': prompts[, 'calib': prompts]} from the config's prompt files (or the shipped ones)."""
  sets = {"eval": read_prompts(cfg.eval.prompts or default_prompt_file("eval"),
                               cfg.eval.num_videos, "eval.prompts", "eval.num_videos")}
  if calibrating:
    sets["calib"] = read_prompts(cfg.calib.prompts or default_prompt_file("calibration"),
                                 cfg.calib.num_prompts, "calib.prompts", "calib.num_prompts")
  return sets


class Conditions(NamedTuple):
  """Embeddings (N, L, D) of N prompts, the null prompt's (L, D), and the prompts."""
  embeddings: np.ndarray
  null: np.ndarray
  prompts: list[str]


def embed(pipe: Pipeline, prompt_sets: dict[str, Sequence[str]], *, max_length: int,
          dtype: str, cache_path: str) -> dict[str, Conditions]:
  """{name: Conditions} of each prompt set, from the cache at `cache_path` when it matches.

  In a multi-process run process 0 reads and writes the cache and the
  others receive its arrays; on a miss every process encodes.
  """
  text_encoder, tokenizer = pipe.component("text_encoder"), pipe.component("tokenizer")
  names = list(prompt_sets)
  everything = [p for name in names for p in prompt_sets[name]] + [NULL_PROMPT]
  key = {"text encoder files": fingerprint.model_digest(text_encoder),
         "tokenizer files": fingerprint.model_digest(tokenizer), "prompts": everything,
         "max_length": max_length, "dtype": dtype, "code": fingerprint.code_version()}
  cached = multihost.share_arrays(multihost.on_writer(lambda: outputs.load_npz(cache_path, key)))
  if cached is None:
    table = _encode(text_encoder, tokenizer, everything, max_length, dtype)
    multihost.on_writer(lambda: outputs.save_npz(cache_path, {"embeddings": table}, key))
  else:
    table = cached["embeddings"]
  out, start = {}, 0
  for name in names:
    n = len(prompt_sets[name])
    out[name] = Conditions(table[start:start + n], table[-1], list(prompt_sets[name]))
    start += n
  return out


def _encode(text_encoder: str, tokenizer: str, prompts: list[str], max_length: int,
            dtype: str) -> np.ndarray:
  """float32 (len(prompts), max_length, d_model) on the host; the encoder is freed after."""
  print(f"  encoding {len(prompts)} prompts with {text_encoder}", flush=True)
  encoder = load_text_encoder(text_encoder, dtype)
  try:
    table = np.asarray(encode_prompts(load_tokenizer(tokenizer), encoder, prompts, max_length),
                       np.float32)
  finally:
    del encoder
    gc.collect()  # the device buffers go with the last reference
  if not np.isfinite(table).all():
    raise UserError(f"the text encoder {text_encoder} gives NaN or Inf embeddings in {dtype}; "
                    "try --config.model.dtype=float32")
  return table
