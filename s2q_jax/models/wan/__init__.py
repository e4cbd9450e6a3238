"""Wan 2.1 (diffusers' `WanTransformer3DModel`): config, Flax model, state-dict mapping."""
from s2q_jax.models.wan.config import WanConfig
from s2q_jax.models.wan.keymap import ARCHITECTURE
from s2q_jax.models.wan.model import WanTransformer3D

__all__ = ["ARCHITECTURE", "WanConfig", "WanTransformer3D"]
