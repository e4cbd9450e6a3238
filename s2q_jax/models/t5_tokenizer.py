"""The T5 tokenizer of a diffusers pipeline's `tokenizer/` folder, without transformers.

Token ids match what diffusers' `CogVideoXPipeline._get_t5_prompt_embeds`
feeds the text encoder: `tokenizer(prompts, padding="max_length",
max_length=226, truncation=True, add_special_tokens=True)`, i.e. the prompt's
pieces cut to `max_length - 1`, then EOS, then padding on the right.

`tokenizer.json` is run by the `tokenizers` package (the fast tokenizer,
exactly); a folder with only `spiece.model` by `sentencepiece`, with
transformers' T5 conventions (EOS appended; "<pad>", "</s>", "<unk>" and the
"<extra_id_N>" sentinels in the text read as their ids). Both packages are
optional dependencies, imported only when a tokenizer is loaded.
"""
from __future__ import annotations

import abc
import importlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from conversion.checkpoint_files import CheckpointError, pipeline_component

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "spiece.model"
TOKENIZER_DIR = "tokenizer"
DEFAULT_MAX_LENGTH = 226  # CogVideoX's max_sequence_length
_INSTALL = "pip install 's2q-jax[pipelines]'"


def _import(name: str):
  try:
    return importlib.import_module(name)
  except ImportError:
    raise ImportError(f"reading this tokenizer needs the '{name}' package: pip install {name} "
                      f"(or {_INSTALL})") from None


class T5Tokenizer(abc.ABC):
  """`tokenizer(prompts, max_length)` → int32 token ids (batch, max_length)."""

  pad_id: int

  def __call__(self, prompts: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
               ) -> np.ndarray:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if bad := [i for i, p in enumerate(prompts) if not isinstance(p, str)]:
      raise TypeError(f"prompts must be strings; items {bad} are not")
    if not isinstance(max_length, (int, np.integer)) or max_length < 1:
      raise ValueError(f"max_length must be a positive integer (room for EOS), got {max_length!r}")
    out = np.full((len(prompts), max_length), self.pad_id, np.int32)
    for row, ids in zip(out, self._encode(prompts, int(max_length))):
      row[:len(ids)] = ids
    return out

  @abc.abstractmethod
  def _encode(self, prompts: list[str], max_length: int) -> list[list[int]]:
    """Each prompt's ids, truncated and with EOS, before padding."""


class FastT5Tokenizer(T5Tokenizer):
  """A `tokenizer.json` run by the `tokenizers` package, as transformers' fast tokenizer does."""

  def __init__(self, path: str, pad_token: str):
    tokenizers = _import("tokenizers")
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
      raise CheckpointError(f"{path} is not a readable tokenizer.json: {e}") from None
    pad_id = self._tokenizer.token_to_id(pad_token)
    if pad_id is None:
      raise CheckpointError(f"{path} has no padding token {pad_token!r} in its vocabulary")
    self.pad_id = pad_id

  def _encode(self, prompts, max_length):
    # A saved tokenizer.json may carry the padding and truncation of its last
    # use; set the pipeline's instead. The post-processor appends EOS.
    self._tokenizer.no_padding()
    self._tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
    return [e.ids for e in self._tokenizer.encode_batch(prompts, add_special_tokens=True)]


class SentencePieceT5Tokenizer(T5Tokenizer):
  """`spiece.model` run by `sentencepiece`, with transformers' T5 special tokens.

  The sentinels "<extra_id_0>" … follow the pieces in reverse order, as in T5
  (e.g. 32099 … 32000 for its 32000-piece model).
  """

  def __init__(self, path: str, special: dict[str, str], extra_ids: int):
    sentencepiece = _import("sentencepiece")
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise CheckpointError(f"{path} is not a readable sentencepiece model: {e}") from None
    pieces = self._sp.GetPieceSize()
    self._special = {}
    for name in ("pad_token", "eos_token", "unk_token"):
      token = special[name]
      piece_id = self._sp.PieceToId(token)
      if self._sp.IdToPiece(piece_id) != token:
        raise CheckpointError(f"{path} has no piece {token!r} for the tokenizer's {name}")
      self._special[token] = piece_id
    self._special.update({f"<extra_id_{i}>": pieces + extra_ids - 1 - i for i in range(extra_ids)})
    self.pad_id = self._special[special["pad_token"]]
    self.eos_id = self._special[special["eos_token"]]
    longest_first = sorted(self._special, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

  def _encode(self, prompts, max_length):
    encoded = []
    for prompt in prompts:
      ids = []
      for i, part in enumerate(self._split.split(prompt)):
        # re.split with a group alternates text (even) and special tokens (odd).
        ids.extend([self._special[part]] if i % 2 else self._sp.EncodeAsIds(part))
      encoded.append(ids[:max_length - 1] + [self.eos_id])
    return encoded


def _token(value, default: str) -> str:
  # transformers writes special tokens as strings or as serialised AddedTokens.
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else default


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_tokenizer(folder: str | os.PathLike) -> T5Tokenizer:
  """The T5 tokenizer of a transformers folder, or of a diffusers pipeline's `tokenizer/`.

  Prefers `tokenizer.json` (needs `tokenizers`), else `spiece.model` (needs
  `sentencepiece`); special tokens come from `tokenizer_config.json` or
  `special_tokens_map.json` when present, else T5's defaults.
  """
  folder = pipeline_component(folder, TOKENIZER_DIR)
  config = {**_read_json(os.path.join(folder, "special_tokens_map.json")),
            **_read_json(os.path.join(folder, "tokenizer_config.json"))}
  special = {name: _token(config.get(name), default) for name, default in
             (("pad_token", "<pad>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
  if os.path.isfile(path := os.path.join(folder, TOKENIZER_JSON)):
    return FastT5Tokenizer(path, special["pad_token"])
  if os.path.isfile(path := os.path.join(folder, SENTENCEPIECE_MODEL)):
    return SentencePieceT5Tokenizer(path, special, int(config.get("extra_ids", 100)))
  raise CheckpointError(f"{folder} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}: pass "
                        f"the {TOKENIZER_DIR}/ folder of a diffusers pipeline")
