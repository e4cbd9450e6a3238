"""Swapping a model's `Linear` layers for `QuantLinear` ones, in place, by rule."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from flax import nnx

from s2q_jax.models.layers import Linear
from s2q_jax.quant.qlinear import QuantLinear
from s2q_jax.quant.rules import QuantRule, match


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  path: str
  shape: tuple[int, int]  # (in, out)
  w_bits: int | None  # None: kept in full precision
  a_bits: int | None

  @property
  def quantized(self) -> bool:
    return self.w_bits is not None


def _modules(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      yield path, node


def _dotted(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def iter_linears(model: nnx.Module) -> Iterator[tuple[str, Linear | QuantLinear]]:
  """(dotted path, layer) of every Linear and QuantLinear, in graph order."""
  for path, node in _modules(model):
    if isinstance(node, (Linear, QuantLinear)):
      yield _dotted(path), node


def quantized_layers(model: nnx.Module) -> list[tuple[str, QuantLinear]]:
  return [(p, m) for p, m in iter_linears(model) if isinstance(m, QuantLinear)]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, nnx.List) else getattr(parent, key)
  if isinstance(parent, nnx.List):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def graph_path(dotted_path: str) -> tuple[str | int, ...]:
  """``transformer_blocks.3.attn1`` → ``("transformer_blocks", 3, "attn1")``, as nnx paths are."""
  return tuple(int(k) if k.isdigit() else k for k in dotted_path.split("."))


def replace_module(model: nnx.Module, dotted_path: str, new: nnx.Module) -> None:
  """Puts `new` at `dotted_path` (e.g. ``transformer_blocks.3.attn1.to_q``) in place."""
  _replace(model, graph_path(dotted_path), new)


def quantize_model(model: nnx.Module, rules: Sequence[QuantRule],
                   layer_cls: type[QuantLinear] = QuantLinear) -> list[LayerInfo]:
  """Replaces every matching Linear by `layer_cls`; returns what happened to each Linear."""
  infos, todo = [], []
  for path, node in _modules(model):
    if not isinstance(node, Linear):
      continue
    bits = match(rules, _dotted(path))
    infos.append(LayerInfo(_dotted(path), (node.in_features, node.out_features),
                           *(bits or (None, None))))
    if bits is not None:
      todo.append((path, node, bits))
  for path, node, (w_bits, a_bits) in todo:  # after the walk: never mutate while iterating
    _replace(model, path, layer_cls(node, w_bits=w_bits, a_bits=a_bits, path=_dotted(path)))
  return infos


def freeze_all(model: nnx.Module) -> None:
  """Fixes the integer codes and scales of every quantized layer not frozen yet."""
  for _, layer in quantized_layers(model):
    if layer.codes is None:
      layer.freeze()
