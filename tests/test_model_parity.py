"""The Flax model against diffusers' PyTorch forward on tiny random configs."""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_torch_model
from s2q_jax.models import CogVideoXConfig, UnsupportedConfigError
from s2q_jax.models.loading import load_pretrained

torch = pytest.importorskip("torch")


def _pipeline_crop_region():
  """diffusers' `get_resize_crop_region_for_grid`, taken from the pipeline's source.

  The pipeline module imports `transformers` at import time; extracting the
  one function keeps the reference diffusers' own code without that package.
  """
  import diffusers.pipelines.cogvideo as cogvideo
  src = open(os.path.join(os.path.dirname(cogvideo.__file__), "pipeline_cogvideox.py")).read()
  fn = next(n for n in ast.parse(src).body
            if isinstance(n, ast.FunctionDef) and n.name == "get_resize_crop_region_for_grid")
  namespace = {}
  exec(compile(ast.Module([fn], []), "pipeline_cogvideox.py", "exec"), namespace)
  return namespace[fn.name]


def _diffusers_rotary(cfg, frames, height, width):
  from diffusers.models.embeddings import get_3d_rotary_pos_embed
  p = cfg["patch_size"]
  grid = (height // p, width // p)
  crops = _pipeline_crop_region()(grid, cfg["sample_width"] // p, cfg["sample_height"] // p)
  return get_3d_rotary_pos_embed(cfg["attention_head_dim"], crops, grid, frames)


CASES = [
    # (config overrides, batch, frames, height, width, text length)
    (dict(), 2, 3, 8, 12, 7),  # sincos (2B-style), native size
    (dict(sample_height=12, sample_width=16), 1, 2, 12, 8, 7),  # sincos, non-square, other size
    (dict(use_rotary_positional_embeddings=True), 2, 3, 8, 12, 5),  # rotary (5B-style)
    (dict(use_rotary_positional_embeddings=True, num_attention_heads=3, attention_head_dim=32,
          num_layers=3, time_embed_dim=48), 1, 4, 12, 6, 11),  # rotary, 3 heads, tall, cropped grid
    (dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
          max_text_seq_length=6), 1, 3, 8, 12, 6),  # learned positions (5B-I2V-style)
    (dict(use_rotary_positional_embeddings=True, patch_size=4, in_channels=3, out_channels=3,
          attention_bias=False, norm_eps=1e-6), 2, 2, 8, 16, 9),  # embedded-model-like
]


@pytest.mark.parametrize("overrides,b,f,h,w,text_len", CASES)
def test_forward_matches_diffusers(tmp_path, overrides, b, f, h, w, text_len):
  tm = make_torch_model(seed=len(overrides) + f, **overrides)
  tm.save_pretrained(tmp_path)
  model = load_pretrained(str(tmp_path), jnp.float32)
  cfg = dict(tm.config)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, f, cfg["in_channels"], h, w), dtype=np.float32)
  text = rng.standard_normal((b, text_len, cfg["text_embed_dim"]), dtype=np.float32)
  t = rng.integers(0, 1000, size=(b,))
  rotary = (_diffusers_rotary(cfg, f, h, w) if cfg["use_rotary_positional_embeddings"] else None)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(t),
             image_rotary_emb=rotary).sample.numpy()
  # The model computes its own rotary table when given none (as the pipeline does)...
  out = np.asarray(model(jnp.asarray(x), jnp.asarray(text), jnp.asarray(t)))
  assert out.shape == ref.shape
  assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4
  if rotary is not None:  # ...and accepts diffusers' (cos, sin) arrays.
    given = tuple(jnp.asarray(r.numpy()) for r in rotary)
    out2 = np.asarray(model(jnp.asarray(x), jnp.asarray(text), jnp.asarray(t), given))
    assert np.abs(out2 - ref).max() / np.abs(ref).max() <= 1e-4


def test_bfloat16_forward_close_to_float32(tiny_diffusers_dir):
  path, _ = tiny_diffusers_dir
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 2, 4, 8, 12), dtype=np.float32))
  text = jnp.asarray(rng.standard_normal((1, 7, 24), dtype=np.float32))
  t = jnp.array([300])
  ref = load_pretrained(str(path), jnp.float32)(x, text, t)
  out = load_pretrained(str(path), jnp.bfloat16)(x, text, t)
  assert out.dtype == jnp.bfloat16
  rel = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  assert rel < 0.05


@pytest.mark.parametrize("field,value", [("patch_size_t", 2), ("ofs_embed_dim", 512),
                                         ("activation_fn", "gelu")])
def test_unsupported_config_fields_are_named(field, value):
  with pytest.raises(UnsupportedConfigError, match=field):
    CogVideoXConfig.from_dict({field: value})


def test_unknown_config_field_is_named():
  with pytest.raises(UnsupportedConfigError, match="frobnicate"):
    CogVideoXConfig.from_dict({"frobnicate": 1})


def test_wrong_input_shape_is_explained(tiny_diffusers_dir):
  model = load_pretrained(str(tiny_diffusers_dir[0]))
  with pytest.raises(ValueError, match="multiples of patch_size"):
    model(jnp.zeros((1, 2, 4, 7, 12)), jnp.zeros((1, 7, 24)), jnp.array([1]))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_matches_jax_and_its_gradient(dtype, tol):
  # On CPU the model normalises after the value product (faster there); the result and
  # its gradient must be those of JAX's generic softmax attention.
  from s2q_jax.models.attention import dot_product_attention
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(3 * rng.standard_normal((2, 3, 40, 16)), dtype) for _ in range(3))
  reference = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
      q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), implementation="xla").swapaxes(1, 2)
  np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v), np.float32),
                             np.asarray(reference(q, k, v), np.float32), rtol=tol, atol=tol)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))  # noqa: E731
  got = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=10 * tol, atol=10 * tol)
