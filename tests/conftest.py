"""Shared fixtures: tiny random diffusers CogVideoX models saved to disk."""
import os

# Tests run on CPU; exact float32 matmuls make parity tolerances meaningful.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Calibration compiles the same block programs for every block and every test: cache them.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            time_embed_dim=32, text_embed_dim=24, num_layers=2, sample_width=12,
            sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=7)


def make_torch_model(seed=0, perturb=0.2, **overrides):
  """A random diffusers CogVideoX transformer with every parameter perturbed.

  diffusers initialises biases and norms to constants; perturbing all of them
  makes a parameter that conversion drops or misplaces change the output.
  """
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  model = diffusers.CogVideoXTransformer3DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * perturb)
  return model


@pytest.fixture
def tiny_diffusers_dir(tmp_path):
  model = make_torch_model(use_rotary_positional_embeddings=True)
  path = tmp_path / "hf"
  model.save_pretrained(path)
  return path, model
