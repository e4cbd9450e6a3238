"""Which layers are quantized, and to how many bits: regex rules on module paths.

Paths are dotted NNX paths such as ``transformer_blocks.3.attn1.to_q``. The
first rule whose pattern matches (``re.search``) decides; a rule with
``w_bits=None`` keeps the layer in full precision.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

from s2q_jax.quant.quantizer import check_bits


@dataclasses.dataclass(frozen=True)
class QuantRule:
  pattern: str
  w_bits: int | None
  a_bits: int | None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"bad layer pattern {self.pattern!r}: {e}") from None
    if self.w_bits is not None:
      check_bits(self.w_bits, f"w_bits of rule {self.pattern!r}")
    if self.a_bits is not None:
      check_bits(self.a_bits, f"a_bits of rule {self.pattern!r}")


def parse_bits(spec: str) -> tuple[int, int | None]:
  """'w4a6' → (4, 6); 'w4' or 'w4afp' → (4, None)."""
  m = re.fullmatch(r"w(\d)(?:a(\d|fp))?", spec.strip().lower())
  if not m:
    raise ValueError(f"bit spec {spec!r} must look like 'w4a6' (or 'w4afp' for FP activations)")
  a = m.group(2)
  return int(m.group(1)), (None if a in (None, "fp") else int(a))


def make_rules(w_bits: int, a_bits: int | None, *, keep_fp: Iterable[str] = (),
               overrides: Mapping[str, str] | None = None) -> list[QuantRule]:
  """keep-FP patterns first, then per-layer overrides, then the default bits for the rest."""
  rules = [QuantRule(p, None, None) for p in keep_fp]
  rules += [QuantRule(p, *parse_bits(spec)) for p, spec in (overrides or {}).items()]
  rules.append(QuantRule(".*", check_bits(w_bits, "quant.w_bits"),
                         None if a_bits is None else check_bits(a_bits, "quant.a_bits")))
  return rules


def rules_from_config(qcfg) -> list[QuantRule]:
  """Rules from a config's `quant` section (w_bits, a_bits, keep_fp, overrides)."""
  return make_rules(qcfg.w_bits, qcfg.a_bits, keep_fp=list(qcfg.keep_fp),
                    overrides=dict(qcfg.overrides))


def match(rules: Sequence[QuantRule], path: str) -> tuple[int, int | None] | None:
  """(w_bits, a_bits) for the layer at `path`, or None to keep it in full precision."""
  for rule in rules:
    if re.search(rule.pattern, path):
      return None if rule.w_bits is None else (rule.w_bits, rule.a_bits)
  return None
