"""Recipe for the small video DiT shipped in `s2q_jax/assets/embedded_dit`.

  python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "workdir/train_embedded"
  c.output = "s2q_jax/assets/embedded_dit"  # diffusers-format folder written at the end
  c.seed = 0

  # CogVideoX-5B-style architecture (3D RoPE, qk-LayerNorm, adaLN-zero) at toy size,
  # working directly in pixel space: 8 frames of 32×32 RGB, 4×4 patches → 512 video tokens.
  c.model = ml_collections.ConfigDict(dict(
      num_attention_heads=4, attention_head_dim=32, in_channels=3, out_channels=3,
      time_embed_dim=128, text_embed_dim=64, num_layers=6, sample_width=32, sample_height=32,
      sample_frames=29, patch_size=4, max_text_seq_length=8,
      use_rotary_positional_embeddings=True))
  c.data = ml_collections.ConfigDict(dict(num_frames=8, height=32, width=32, text_len=8))

  c.batch_size = 8
  c.num_steps = 1800
  c.learning_rate = 1e-3
  c.warmup_steps = 150
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.cond_dropout = 0.1  # fraction trained unconditionally, for classifier-free guidance
  # 0: export the trained weights. An EMA needs many more steps than this short CPU run: at
  # 0.999 over 1800 steps it still carries ~37% of the first 800 steps' weights (noisier videos).
  c.ema_decay = 0.0
  c.log_every = 50
  c.checkpoint_every = 500
  return c
