"""Flax NNX video diffusion transformers, the CogVideoX VAE decoder, and their loading."""
from s2q_jax.models.cogvideox import CogVideoXTransformer3D
from s2q_jax.models.config import CogVideoXConfig, UnsupportedConfigError
from s2q_jax.models.layers import Linear
from s2q_jax.models.loading import load_pretrained
from s2q_jax.models.vae import CogVideoXVAE, Tiling
from s2q_jax.models.vae_config import CogVideoXVAEConfig
from s2q_jax.models.vae_loading import load_vae

__all__ = ["CogVideoXConfig", "CogVideoXTransformer3D", "CogVideoXVAE", "CogVideoXVAEConfig",
           "Linear", "Tiling", "UnsupportedConfigError", "load_pretrained", "load_vae"]
