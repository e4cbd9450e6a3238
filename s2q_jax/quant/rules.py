r"""Which layers are quantized, and to how many bits: regex rules on module paths.

Paths are dotted NNX paths such as ``transformer_blocks.3.attn1.to_q``. The
first rule whose pattern matches (``re.search``, so anchor with ^/$ and end
block numbers with ``\.``: ``transformer_blocks\.1`` also matches block 10)
decides; a rule with ``w_bits=None`` keeps the layer in full precision.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Optional, Sequence, Tuple, Union

from s2q_jax.quant.quantizer import check_bits


# Kept in full precision by default: embeddings and the output head. Anchored,
# because an unanchored `proj_out$` would also catch every block's `ff.proj_out`.
# Everything else, the adaLN modulation linears (`norm1.linear`) included, is quantized.
DEFAULT_KEEP_FP = (r"^patch_embed\.", r"^time_embedding\.", r"^ofs_embedding\.",
                   r"^norm_out\.", r"^proj_out$")


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
      if self.w_bits is None:
        raise ValueError(f"rule {self.pattern!r}: a_bits={self.a_bits} without w_bits; "
                         "activation-only quantization is not supported")


def parse_bits(spec: str) -> tuple[int, int | None]:
  """'w4a6' → (4, 6); 'w4' or 'w4afp' → (4, None)."""
  m = re.fullmatch(r"w(\d)(?:a(\d|fp))?", spec.strip().lower())
  if not m:
    raise ValueError(f"bit spec {spec!r} must look like 'w4a6' (or 'w4afp' for FP activations)")
  a = m.group(2)
  return int(m.group(1)), (None if a in (None, "fp") else int(a))


BitSpec = Union[str, Tuple[int, Optional[int]]]


def _override_bits(pattern: str, spec: BitSpec) -> tuple[int, int | None]:
  if isinstance(spec, str):
    return parse_bits(spec)
  if isinstance(spec, (tuple, list)) and len(spec) == 2:
    return spec[0], spec[1]
  raise ValueError(f"override {pattern!r}: bits {spec!r} must be 'w4a6' or (w_bits, a_bits)")


Overrides = Union[Mapping[str, BitSpec], Sequence[Tuple[str, BitSpec]]]


def make_rules(w_bits: int, a_bits: int | None, *, keep_fp: Iterable[str] = DEFAULT_KEEP_FP,
               overrides: Overrides | None = None) -> list[QuantRule]:
  """keep-FP patterns first, then per-layer overrides, then the default bits for the rest.

  `overrides` maps a path regex to 'w8a8' / 'w4afp' or a (w_bits, a_bits) pair, in
  priority order (first match wins, so list the more specific pattern first). A
  sequence of (regex, bits) pairs works too: ml_collections' ConfigDict refuses keys
  with dots unless built with `allow_dotted_keys=True`, and most regexes have dots.
  """
  pairs = list(overrides.items()) if hasattr(overrides, "items") else list(overrides or ())
  rules = [QuantRule(p, None, None) for p in keep_fp]
  rules += [QuantRule(p, *_override_bits(p, spec)) for p, spec in pairs]
  rules.append(QuantRule(".*", check_bits(w_bits, "quant.w_bits"),
                         None if a_bits is None else check_bits(a_bits, "quant.a_bits")))
  return rules


def rules_from_config(qcfg, defaults: tuple[Sequence[str], Overrides] = (DEFAULT_KEEP_FP, ())
                      ) -> list[QuantRule]:
  """Rules from a config's `quant` section: w_bits, a_bits, optional keep_fp and overrides.

  An unset (None) keep_fp or overrides takes `defaults` = (keep_fp, overrides),
  the model's own (`quant_defaults()` of its class).
  """
  keep_fp = getattr(qcfg, "keep_fp", None)
  overrides = getattr(qcfg, "overrides", None)
  return make_rules(qcfg.w_bits, qcfg.a_bits,
                    keep_fp=list(defaults[0] if keep_fp is None else keep_fp),
                    overrides=defaults[1] if overrides is None else overrides)


def match(rules: Sequence[QuantRule], path: str) -> tuple[int, int | None] | None:
  """(w_bits, a_bits) for the layer at `path`, or None to keep it in full precision."""
  for rule in rules:
    if re.search(rule.pattern, path):
      return None if rule.w_bits is None else (rule.w_bits, rule.a_bits)
  return None
