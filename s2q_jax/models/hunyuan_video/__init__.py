"""HunyuanVideo (diffusers' `HunyuanVideoTransformer3DModel`, text-to-video): config, Flax
model, state-dict mapping."""
from s2q_jax.models.hunyuan_video.config import HunyuanVideoConfig
from s2q_jax.models.hunyuan_video.keymap import ARCHITECTURE
from s2q_jax.models.hunyuan_video.model import HunyuanVideoTransformer3D

__all__ = ["ARCHITECTURE", "HunyuanVideoConfig", "HunyuanVideoTransformer3D"]
