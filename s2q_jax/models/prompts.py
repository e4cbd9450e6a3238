"""Prompts → T5 text embeddings, as diffusers' `CogVideoXPipeline.encode_prompt` computes them."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s2q_jax.models.t5 import T5Encoder
from s2q_jax.models.t5_tokenizer import DEFAULT_MAX_LENGTH, T5Tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(input_ids)


def encode_prompts(tokenizer: T5Tokenizer, encoder: T5Encoder, prompts: str | Sequence[str],
                   max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8) -> jax.Array:
  """(len(prompts), max_length, d_model) embeddings of the padded, EOS-terminated prompts.

  No attention mask, as in the pipeline: the padding is attended to. Prompts
  run `batch_size` at a time through one compiled program (the last batch is
  padded to full size), which bounds activation memory for long prompt lists.
  """
  input_ids = tokenizer(prompts, max_length)
  if not len(input_ids):
    raise ValueError("no prompts to encode")
  if (top := int(input_ids.max(initial=0))) >= encoder.config.vocab_size:
    raise ValueError(f"the tokenizer produced id {top}, past the text encoder's vocab_size "
                     f"{encoder.config.vocab_size}: the tokenizer and text encoder do not belong "
                     "together")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  graphdef, state = nnx.split(encoder)
  n = len(input_ids)
  chunks = []
  for start in range(0, n, batch_size):
    chunk = input_ids[start:start + batch_size]
    filled = np.full((min(batch_size, n), max_length), tokenizer.pad_id, np.int32)
    filled[:len(chunk)] = chunk
    chunks.append(_encode(graphdef, state, jnp.asarray(filled))[:len(chunk)])
  return jnp.concatenate(chunks)
