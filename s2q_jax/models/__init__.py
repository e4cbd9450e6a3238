"""Flax NNX video diffusion transformers and their loading."""
from s2q_jax.models.cogvideox import CogVideoXTransformer3D
from s2q_jax.models.config import CogVideoXConfig, UnsupportedConfigError
from s2q_jax.models.layers import Linear
from s2q_jax.models.loading import load_pretrained
from s2q_jax.models.wan import WanConfig, WanTransformer3D

__all__ = ["CogVideoXConfig", "CogVideoXTransformer3D", "Linear", "UnsupportedConfigError",
           "WanConfig", "WanTransformer3D", "load_pretrained"]
