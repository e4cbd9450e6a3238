"""HunyuanVideo: the Flax model against diffusers' PyTorch forward, conversion both ways,
and every bad config or input."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion import diffusers_to_flax, flax_to_diffusers
from conversion.checkpoint_files import CheckpointError
from s2q_jax.models import HunyuanVideoConfig, HunyuanVideoTransformer3D, UnsupportedConfigError
from s2q_jax.models.config import MissingConfigFieldWarning
from s2q_jax.models.hunyuan_video.embeddings import rotary_pos_embed_3d
from s2q_jax.models.loading import load_pretrained, read_config
from s2q_jax.models.params import flat_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
WEIGHTS = "diffusion_pytorch_model.safetensors"

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
            patch_size_t=1, text_embed_dim=12, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))


def make_torch_model(seed=0, perturb=0.2, **overrides):
  """A random diffusers HunyuanVideo transformer with every parameter perturbed, norms included,
  so a parameter that conversion drops or misplaces changes the output."""
  torch.manual_seed(seed)
  model = diffusers.HunyuanVideoTransformer3DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * perturb)
  return model


@pytest.fixture
def hunyuan_dir(tmp_path):
  model = make_torch_model()
  model.save_pretrained(tmp_path / "hf")
  return tmp_path / "hf", model


def make_inputs(cfg: dict, b, f, h, w, mask, seed=0):
  """diffusers-layout inputs: latents (B,C,F,H,W), timestep, text states, mask, pooled, guidance."""
  rng = np.random.default_rng(seed)
  mask = np.asarray(mask, np.int64)
  return dict(
      hidden_states=rng.standard_normal((b, cfg["in_channels"], f, h, w), dtype=np.float32),
      timestep=rng.integers(1, 1000, size=(b,)).astype(np.float32),
      encoder_hidden_states=rng.standard_normal((b, mask.shape[1], cfg["text_embed_dim"]),
                                                dtype=np.float32),
      encoder_attention_mask=mask,
      pooled_projections=rng.standard_normal((b, cfg["pooled_projection_dim"]), dtype=np.float32),
      guidance=(rng.uniform(1, 8, size=(b,)).astype(np.float32) * 1000
                if cfg["guidance_embeds"] else None))


def torch_forward(tm, inputs):
  with torch.no_grad():
    args = {k: None if v is None else torch.from_numpy(v) for k, v in inputs.items()}
    return tm(**args).sample.numpy()


# One compiled program per config: op-by-op (eager) execution compiles every op separately,
# which is many times slower on CPU.
_forward = nnx.jit(lambda model, inputs: model(**inputs))


def flax_forward(model, inputs):
  return _forward(model, {k: None if v is None else jnp.asarray(v) for k, v in inputs.items()})


def relative_error(out, ref):
  return float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())


CASES = {
    # name: (config overrides, (B, F, H, W), encoder_attention_mask)
    "base": (dict(), (2, 3, 4, 6), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    "no-guidance,3x8-heads,p1,2+0-layers,2-refiners": (
        dict(guidance_embeds=False, num_attention_heads=3, attention_head_dim=8,
             rope_axes_dim=(2, 2, 4), patch_size=1, num_layers=2, num_single_layers=0,
             num_refiner_layers=2, text_embed_dim=20, pooled_projection_dim=6),
        (1, 2, 3, 5), [[1, 1, 1, 1, 0, 0, 0]]),
    "pt2,0+2-layers,mlp2,in3-out5,no-refiner,theta1e4": (
        dict(patch_size_t=2, attention_head_dim=24, rope_axes_dim=(8, 8, 8), num_layers=0,
             num_single_layers=2, num_refiner_layers=0, mlp_ratio=2.0, in_channels=3,
             out_channels=5, rope_theta=10000.0),
        (2, 4, 4, 4), [[1, 0, 0, 0], [1, 1, 1, 0]]),
    "mask-with-holes,out-channels-null": (
        dict(out_channels=None, num_refiner_layers=2, num_layers=2, num_single_layers=2,
             mlp_ratio=3.0),
        (2, 2, 2, 4), [[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0]]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_diffusers(tmp_path, name):
  overrides, (b, f, h, w), mask = CASES[name]
  tm = make_torch_model(seed=len(name), **overrides)
  tm.save_pretrained(tmp_path)
  model = load_pretrained(str(tmp_path), jnp.float32)
  assert isinstance(model, HunyuanVideoTransformer3D)
  inputs = make_inputs(dict(tm.config), b, f, h, w, mask)
  ref = torch_forward(tm, inputs)
  out = flax_forward(model, inputs)
  assert out.shape == ref.shape == (b, model.config.output_channels, f, h, w)
  assert relative_error(out, ref) <= 1e-4


def test_bfloat16_forward_close_to_diffusers_float32(hunyuan_dir):
  path, tm = hunyuan_dir
  inputs = make_inputs(dict(tm.config), 1, 2, 4, 4, [[1, 1, 0, 0, 0]])
  out = flax_forward(load_pretrained(str(path), jnp.bfloat16), inputs)
  assert out.dtype == jnp.bfloat16
  assert relative_error(out, torch_forward(tm, inputs)) < 0.05


def test_rotary_table_matches_diffusers():
  from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed
  axes, theta = (4, 6, 6), 256.0
  ref_cos, ref_sin = HunyuanVideoRotaryPosEmbed(2, 1, list(axes), theta)(torch.zeros(1, 4, 3, 6, 8))
  cos, sin = rotary_pos_embed_3d(axes, 3, 3, 4, theta)
  np.testing.assert_allclose(cos, ref_cos.numpy(), atol=1e-6)
  np.testing.assert_allclose(sin, ref_sin.numpy(), atol=1e-6)


def test_round_trip_diffusers_flax_diffusers_is_exact(hunyuan_dir, tmp_path):
  src, tm = hunyuan_dir
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "flax"),
                                 "--dtype", "float32"]) == 0
  flax_model = load_pretrained(str(tmp_path / "flax"))
  assert isinstance(flax_model, HunyuanVideoTransformer3D)
  assert flax_to_diffusers.main(["--src", str(tmp_path / "flax"), "--dst",
                                 str(tmp_path / "hf2")]) == 0
  back = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "hf2")
  assert HunyuanVideoConfig.from_dict(dict(back.config)) == HunyuanVideoConfig.from_dict(
      dict(tm.config))
  original, returned = tm.state_dict(), back.state_dict()
  assert original.keys() == returned.keys()
  assert all(torch.equal(original[k], returned[k]) for k in original)
  a, b = flat_params(flax_model), flat_params(load_pretrained(str(tmp_path / "hf2")))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_loads(hunyuan_dir, tmp_path):
  src, tm = hunyuan_dir
  tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / f"{WEIGHTS}.index.json").exists()
  a = flat_params(load_pretrained(str(src)))
  b = flat_params(load_pretrained(str(tmp_path / "sharded")))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_key_problems_are_listed_together(hunyuan_dir):
  src, _ = hunyuan_dir
  tensors = load_file(src / WEIGHTS)
  del tensors["single_transformer_blocks.0.attn.norm_k.weight"]
  del tensors["context_embedder.token_refiner.refiner_blocks.0.ff.net.2.bias"]
  tensors["transformer_blocks.0.attn.to_add_out.extra"] = np.zeros(3, np.float32)
  tensors["x_embedder.proj.weight"] = np.zeros((32, 4, 2, 2, 2), np.float32)
  save_file(tensors, src / WEIGHTS)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(str(src))
  for fragment in ["missing keys", "single_transformer_blocks.0.attn.norm_k.weight",
                   "refiner_blocks.0.ff.net.2.bias", "unexpected keys",
                   "transformer_blocks.0.attn.to_add_out.extra", "mis-shaped keys",
                   "x_embedder.proj.weight (32, 4, 2, 2, 2) (expected (32, 4, 1, 2, 2))"]:
    assert fragment in str(e.value)


def _edit_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(changes)
  for key in [k for k, v in changes.items() if v is ...]:
    del cfg[key]
  (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,says", [
    (dict(image_condition_type="token_replace"), "image_condition_type='token_replace'"),
    (dict(image_condition_type="latent_concat"), "text-to-video HunyuanVideo only"),
    (dict(qk_norm="layer_norm"), "qk_norm='layer_norm'"),
    (dict(rope_axes_dim=[4, 6, 4]), "summing to attention_head_dim=16"),
    (dict(frobnicate=1), "config fields not supported: frobnicate"),
    (dict(_class_name="UNet3DConditionModel"),
     "_class_name 'UNet3DConditionModel' is not supported; s2q-jax loads"),
])
def test_unsupported_config_is_named(hunyuan_dir, tmp_path, capsys, changes, says):
  src, _ = hunyuan_dir
  _edit_config(src, **changes)
  with pytest.raises(UnsupportedConfigError, match=re.escape(says)):
    load_pretrained(str(src))
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "o")]) == 1
  assert says in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_missing_config_field_warns_with_hunyuan_default(hunyuan_dir):
  src, _ = hunyuan_dir
  _edit_config(src, rope_theta=...)
  with pytest.warns(MissingConfigFieldWarning, match="rope_theta=256.0"):
    read_config(str(src))


def abstract_model(**overrides):
  """Input checks run before any computation: a model of shapes only is enough."""
  config = HunyuanVideoConfig(**{**TINY, **overrides})
  return nnx.eval_shape(lambda: HunyuanVideoTransformer3D(config, rngs=nnx.Rngs(0)))


def _good_args():
  return make_inputs({**TINY, "guidance_embeds": True}, 2, 2, 4, 4, [[1, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("edit,says", [
    (dict(hidden_states=np.zeros((2, 3, 2, 4, 4))), r"hidden_states must be \(B, 4, F, H, W\)"),
    (dict(hidden_states=np.zeros((2, 4, 2, 5, 4))), "multiples of patch_size=2"),
    (dict(encoder_hidden_states=np.zeros((2, 3, 7))),
     r"encoder_hidden_states must be \(B=2, L, 12\)"),
    (dict(encoder_attention_mask=np.ones((2, 4))),
     r"encoder_attention_mask must be \(B, L\) = \(2, 3\)"),
    (dict(encoder_attention_mask=np.array([[1, 1, 0], [0, 0, 0]])),
     r"no valid text token in batch rows \[1\]"),
    (dict(pooled_projections=np.zeros((2, 9))), r"pooled_projections must be .* \(2, 8\)"),
    (dict(timestep=np.zeros((3,))), r"timestep must be a scalar or \(B,\) = \(2,\)"),
    (dict(guidance=None), "pass guidance"),
])
def test_bad_inputs_are_explained(edit, says):
  args = {**_good_args(), **edit}
  with pytest.raises(ValueError, match=says):
    abstract_model()(**{k: None if v is None else jnp.asarray(v) for k, v in args.items()})


def test_guidance_for_a_model_without_guidance_embedding_is_refused():
  model = abstract_model(guidance_embeds=False)
  args = {k: jnp.asarray(v) for k, v in _good_args().items()}
  with pytest.raises(ValueError, match="no guidance embedding"):
    model(**args)


def test_parameter_paths_are_diffusers_keys(hunyuan_dir):
  """Quantization rules match Flax paths: they must read like diffusers' keys."""
  from s2q_jax.models.hunyuan_video import keymap  # pylint: disable=import-outside-toplevel
  src, tm = hunyuan_dir
  paths = flat_params(load_pretrained(str(src)))
  assert sorted(keymap.torch_key(p) for p in paths) == sorted(tm.state_dict())
  assert "single_transformer_blocks.0.proj_out.kernel" in paths
  assert "transformer_blocks.0.attn.to_out.kernel" in paths  # diffusers: attn.to_out.0.weight


# The VideoDiT interface the quantization job runs HunyuanVideo through (models.interface).

def test_packed_conditions_denoise_is_the_diffusers_forward(hunyuan_dir):
  """Job layout (B, F, C, H, W) and packed conditions in, the diffusers sample out."""
  from s2q_jax.models.hunyuan_video import conditions
  path, tm = hunyuan_dir
  model = load_pretrained(str(path), jnp.float32)
  inputs = make_inputs(dict(tm.config), 2, 3, 4, 6, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  packed = conditions.pack(model.config, inputs["encoder_hidden_states"],
                           inputs["encoder_attention_mask"], inputs["pooled_projections"],
                           inputs["guidance"])
  back = conditions.unpack(model.config, packed)
  np.testing.assert_array_equal(back.text, inputs["encoder_hidden_states"])
  np.testing.assert_array_equal(back.mask, inputs["encoder_attention_mask"].astype(bool))
  np.testing.assert_array_equal(back.pooled, inputs["pooled_projections"])
  np.testing.assert_array_equal(back.guidance, inputs["guidance"])
  latents = jnp.asarray(inputs["hidden_states"]).swapaxes(1, 2)
  out = nnx.jit(lambda m, x, c, t: m.denoise(x, c, t))(
      model, latents, jnp.asarray(packed), jnp.asarray(inputs["timestep"]))
  assert relative_error(np.asarray(out).swapaxes(1, 2), torch_forward(tm, inputs)) <= 1e-4
  with pytest.raises(ValueError, match="packed"):
    model.denoise(latents, jnp.asarray(inputs["encoder_hidden_states"]), inputs["timestep"])


def test_block_by_block_is_the_forward():
  """embed_blocks → every block's calibration_call (text-first streams) → head = the model."""
  config = HunyuanVideoConfig(**{**TINY, "num_layers": 2, "num_single_layers": 2})
  model = HunyuanVideoTransformer3D(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  cond, _ = model.stand_in_conditions(rng, 2)
  cond, _, cfg_scale = model.apply_guidance(cond, cond[0], 6.0)
  assert cfg_scale == 1.0  # guidance-distilled: no null-prompt pass
  latents = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 6)), jnp.float32)
  t = jnp.asarray([800.0, 30.0])
  state = model.embed_blocks(latents, jnp.asarray(cond), t)
  stream = state.stream
  extras = model.block_extras(2, 4, 6)
  for _, block in model.calibration_blocks():
    stream = block.calibration_call(stream, state.context, extras)
  text, video = stream
  assert text.shape[1] == model.stream_layout(2, cond.shape[1])[0]
  out = model.head(video, state.context[0], (2, 4, 2, 4, 6)).swapaxes(1, 2)
  np.testing.assert_allclose(out, model.denoise(latents, jnp.asarray(cond), t), rtol=0,
                             atol=1e-5)
  _, _, valid = model.calibration_blocks()[-1][1].self_attention_qk(state.stream, state.context,
                                                                    extras)
  mask = np.asarray(cond)[:, :-1, -1] > 0.5  # the packed prompts' masks
  assert not mask.all()
  np.testing.assert_array_equal(valid[:, :mask.shape[1]], mask)  # text first: the prompt's mask
  assert bool(np.all(valid[:, mask.shape[1]:]))  # every video token


def test_stand_in_prompts_guidance_and_token_roles():
  from s2q_jax.models.hunyuan_video import conditions
  model = HunyuanVideoTransformer3D(HunyuanVideoConfig(**TINY), rngs=nnx.Rngs(0))
  cond, null = model.stand_in_conditions(np.random.default_rng(0), 4)
  assert cond.shape == (4, *model.condition_shape()) and null.shape == cond.shape[1:]
  c = conditions.unpack(model.config, cond)
  valid = np.asarray(c.mask).sum(1)
  assert np.all(valid >= conditions.HUNYUAN_TEXT_TOKENS // 2) and len(set(valid.tolist())) > 1
  assert np.all(np.asarray(c.mask)[np.arange(4), valid - 1])  # valid tokens come first
  assert conditions.unpack(model.config, null[None]).mask.sum() == 1
  guided, guided_null, scale = model.apply_guidance(cond, null, 6.0)
  assert scale == 1.0 and np.all(conditions.unpack(model.config, guided).guidance == 6000.0)
  assert conditions.unpack(model.config, guided_null[None]).guidance[0] == 6000.0
  cfg_model = HunyuanVideoTransformer3D(HunyuanVideoConfig(**TINY, guidance_embeds=False),
                                        rngs=nnx.Rngs(0))
  assert cfg_model.apply_guidance(cond, null, 6.0)[2] == 6.0  # classifier-free instead
  roles = {p: model.layer_tokens(p) for p in (
      "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
      "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff_context.net.0.proj",
      "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_q",
      "single_transformer_blocks.0.proj_out")}
  assert roles == {"transformer_blocks.0.attn.to_q": "video",
                   "transformer_blocks.0.attn.add_k_proj": "context",
                   "transformer_blocks.0.attn.to_add_out": "context",
                   "transformer_blocks.0.ff_context.net.0.proj": "context",
                   "transformer_blocks.0.ff.net.2": "video",
                   "single_transformer_blocks.0.attn.to_q": "stream",
                   "single_transformer_blocks.0.proj_out": "stream"}
