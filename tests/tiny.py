"""Tiny model configurations shared by test modules (prepended to sys.path by pytest)."""
from s2q_jax.models import CogVideoXConfig

# One rotary block, 8×8 pixels in 4×4 patches: the smallest model every quantized layer has.
ONE_BLOCK = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=3,
                            out_channels=3, time_embed_dim=32, text_embed_dim=16, num_layers=1,
                            sample_width=8, sample_height=8, sample_frames=5, patch_size=4,
                            max_text_seq_length=4, use_rotary_positional_embeddings=True)
