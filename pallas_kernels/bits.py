"""Signed b-bit integer ranges shared by weights and activations."""
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
  if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{what}={bits!r}: must be an integer from {MIN_BITS} to {MAX_BITS}")
  return bits


def qrange(bits: int) -> tuple[int, int]:
  """(lowest, highest) code of a signed b-bit integer: 6 bits → (-32, 31)."""
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
