"""Flax NNX video diffusion transformers, the T5 text encoder, the CogVideoX VAE decoder, and
their loading."""
from s2q_jax.models.cogvideox import CogVideoXTransformer3D
from s2q_jax.models.config import CogVideoXConfig, UnsupportedConfigError
from s2q_jax.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoTransformer3D
from s2q_jax.models.layers import Linear
from s2q_jax.models.loading import load_pretrained
from s2q_jax.models.prompts import encode_prompts
from s2q_jax.models.t5 import T5Encoder
from s2q_jax.models.t5_config import T5EncoderConfig
from s2q_jax.models.t5_loading import load_text_encoder
from s2q_jax.models.t5_tokenizer import T5Tokenizer, load_tokenizer
from s2q_jax.models.vae import CogVideoXVAE, Tiling
from s2q_jax.models.vae_config import CogVideoXVAEConfig
from s2q_jax.models.vae_loading import load_vae
from s2q_jax.models.wan import WanConfig, WanTransformer3D

__all__ = ["CogVideoXConfig", "CogVideoXTransformer3D", "CogVideoXVAE", "CogVideoXVAEConfig",
           "HunyuanVideoConfig", "HunyuanVideoTransformer3D", "Linear", "T5Encoder",
           "T5EncoderConfig", "T5Tokenizer", "Tiling", "UnsupportedConfigError", "WanConfig",
           "WanTransformer3D", "encode_prompts", "load_pretrained", "load_text_encoder",
           "load_tokenizer", "load_vae"]
