"""Sparse token distillation: attention-guided token weights for block reconstruction."""
from s2q_jax.distillation.token_importance import (attention_token_importance, token_weights,
                                                   weighted_token_mse)

__all__ = ["attention_token_importance", "token_weights", "weighted_token_mse"]
