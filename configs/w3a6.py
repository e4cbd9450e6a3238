"""W3A6: 3-bit per-channel weights, 6-bit dynamic per-token activations.

Calibrated with S²Q-VDiT; --config.method=rtn for round-to-nearest.
"""
from s2q_jax.job_config import base_config


def get_config():
  return base_config(w_bits=3, a_bits=6, method="s2q")
