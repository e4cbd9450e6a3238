"""Recipe for the small video DiT shipped in `s2q_jax/assets/embedded_dit`, in two stages.

  python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py:base
  python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py:refine

`base` trains from random weights for 1800 steps; `refine` starts from its
output with a warm restart of the learning rate (lower peak, an EMA of the
weights) for 1500 more steps and writes the shipped model. Two stages, not one
longer schedule, because the first was shipped on its own before the second
was added; together they are the whole recipe.

  python -m s2q_jax.tools.train_embedded --config configs/train_embedded.py:long \
      --config.max_minutes=5

`long` is the candidate successor, sized for an accelerator rather than this
2-core CPU: the same architecture from random weights on 24× the samples of
both stages together (batch 64). It writes to workdir/, not over the shipped
model, until its videos have been looked at; it has not been run yet.
"""
import ml_collections

STAGES = ("base", "refine", "long")


def get_config(stage: str = "refine") -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r}: use configs/train_embedded.py:" + " or :".join(STAGES))
  c = ml_collections.ConfigDict()
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
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.cond_dropout = 0.1  # fraction trained unconditionally, for classifier-free guidance
  c.log_every = 50
  c.checkpoint_every = 250
  c.max_minutes = 0.0  # > 0: checkpoint and export at this wall time; the same command resumes
  if stage == "base":
    c.workdir = "workdir/train_embedded/base"
    c.output = "workdir/train_embedded/base_model"  # diffusers-format folder written at the end
    c.init_from = ""
    c.num_steps = 1800
    c.learning_rate = 1e-3
    c.warmup_steps = 150
    # 0: export the trained weights. At 0.999 over 1800 steps from random weights an EMA
    # still carries ~37% of the first 800 steps' weights (noisier videos).
    c.ema_decay = 0.0
  elif stage == "long":
    c.workdir = "workdir/train_embedded/long"
    c.output = "workdir/train_embedded/long_model"
    c.init_from = ""
    c.batch_size = 64
    c.num_steps = 10000
    c.learning_rate = 1e-3
    c.warmup_steps = 500
    c.ema_decay = 0.999  # ~1000 steps, a tenth of the run
    c.log_every = 250
    c.checkpoint_every = 1000
  else:
    c.workdir = "workdir/train_embedded/refine"
    c.output = "s2q_jax/assets/embedded_dit"
    c.init_from = "workdir/train_embedded/base_model"
    c.num_steps = 1500
    c.learning_rate = 4e-4
    c.warmup_steps = 50
    # Starting from trained weights, an EMA over the last ~500 steps only averages out
    # the gradient noise that leaves speckles in the videos.
    c.ema_decay = 0.998
  return c
