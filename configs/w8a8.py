"""W8A8: 8-bit per-channel weights, 8-bit dynamic per-token activations."""
from s2q_jax.job_config import base_config


def get_config():
  return base_config(w_bits=8, a_bits=8, method="rtn")
