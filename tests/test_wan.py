"""Wan 2.1: the Flax model against diffusers' PyTorch forward, conversion both ways, bad inputs."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion import diffusers_to_flax, flax_to_diffusers
from conversion.checkpoint_files import CheckpointError
from conversion.keymap import to_flax
from s2q_jax.models import UnsupportedConfigError, WanConfig, load_pretrained
from s2q_jax.models.config import MissingConfigFieldWarning
from s2q_jax.models.loading import abstract_model, model_from_params
from s2q_jax.models.params import flat_params, param_shapes
from s2q_jax.models.wan.keymap import torch_key, torch_shape
from s2q_jax.quant.apply import freeze_all, iter_linears, quantize_model
from s2q_jax.quant.rules import make_rules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
WEIGHTS = "diffusion_pytorch_model.safetensors"

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2,
            rope_max_seq_len=32)
I2V = dict(image_dim=12, added_kv_proj_dim=24)  # added_kv_proj_dim = heads · head_dim


def make_torch_wan(seed=0, perturb=0.2, **overrides):
  """A random diffusers Wan transformer with every parameter perturbed.

  diffusers initialises biases, norms and positions to constants; perturbing
  all of them makes a parameter that conversion drops or misplaces change
  the output.
  """
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * perturb)
  return model


def _inputs(cfg, b, f, h, w, text_len, image_len=None, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, cfg["in_channels"], f, h, w), dtype=np.float32)
  text = rng.standard_normal((b, text_len, cfg["text_dim"]), dtype=np.float32)
  t = rng.uniform(0, 1000, size=(b,)).astype(np.float32)  # flow-matching steps are fractional
  image = None
  if image_len is not None:
    rows = 2 * b if cfg.get("pos_embed_seq_len") else b
    image = rng.standard_normal((rows, image_len, cfg["image_dim"]), dtype=np.float32)
  return x, t, text, image


def _reference(tm, x, t, text, image):
  as_torch = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
  with torch.no_grad():
    return tm(as_torch(x), as_torch(t), as_torch(text),
              encoder_hidden_states_image=as_torch(image)).sample.numpy()


@nnx.jit
def _forward(model, *inputs):
  return model(*inputs)  # compiled whole: op-by-op dispatch compiles far more on first use


def _run(model, x, t, text, image=None):
  as_jax = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
  return np.asarray(_forward(model, as_jax(x), as_jax(t), as_jax(text), as_jax(image)),
                    np.float32)


CASES = {
    # name: (config overrides, batch, frames, height, width, text length, image tokens)
    "base_odd_frames": (dict(), 2, 3, 6, 8, 5, None),
    "t_patch_3heads_no_cross_norm": (
        dict(patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=3,
             out_channels=5, text_dim=10, freq_dim=16, ffn_dim=24, cross_attn_norm=False,
             eps=1e-5), 1, 4, 4, 6, 7, None),
    "flat_patch_1layer_short_rope": (
        dict(patch_size=(1, 1, 2), attention_head_dim=16, num_layers=1, out_channels=None,
             ffn_dim=37, freq_dim=20, rope_max_seq_len=6), 2, 5, 6, 4, 3, None),
    # Plain image-to-video is compared stage by stage in test_stages_match_diffusers_modules.
    "flf2v_image_positions": (dict(**I2V, pos_embed_seq_len=8, num_layers=1), 1, 1, 4, 6, 512, 4),
}
# Relative max errors measured by the last run, written to WAN_PARITY_REPORT when set.
MEASURED = {}


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_diffusers(tmp_path, name):
  overrides, b, f, h, w, text_len, image_len = CASES[name]
  tm = make_torch_wan(seed=list(CASES).index(name), **overrides)
  tm.save_pretrained(tmp_path)
  model = load_pretrained(str(tmp_path), jnp.float32)
  inputs = _inputs(dict(tm.config), b, f, h, w, text_len, image_len)
  ref = _reference(tm, *inputs)
  out = _run(model, *inputs)
  assert out.shape == ref.shape == (b, tm.config.out_channels or tm.config.in_channels, f, h, w)
  MEASURED[name] = rel = float(np.abs(out - ref).max() / np.abs(ref).max())
  if os.environ.get("WAN_PARITY_REPORT"):
    with open(os.environ["WAN_PARITY_REPORT"], "w") as fh:
      json.dump(MEASURED, fh, indent=1)
  assert rel <= 1e-4


@nnx.jit
def _stages(model, x, t, text, image):
  """Runs the model stage by stage as block-wise calibration does, returning every stage."""
  tokens, context, image_context, timestep_proj, temb = model.embed(x, t, text, image)
  rotary = model.rotary_embedding(*x.shape[2:])
  outs = [tokens]
  for block in model.blocks:
    outs.append(block(outs[-1], context, timestep_proj, rotary, image_context))
  return (context, image_context, timestep_proj, temb, rotary, outs,
          model.head(outs[-1], temb, x.shape))


def test_stages_match_diffusers_modules():
  """embed, rotary_embedding, each of blocks and head against diffusers' submodules."""
  tm = make_torch_wan(seed=7, **I2V)
  cfg = WanConfig.from_dict(dict(tm.config))
  state = {k: v.numpy() for k, v in tm.state_dict().items()}
  shapes = {p: s for p, (s, _) in param_shapes(abstract_model(cfg)).items()}
  model = model_from_params(cfg, {p: to_flax(p, state[torch_key(p)], s) for p, s in shapes.items()})
  inputs = _inputs(dict(tm.config), 2, 3, 4, 6, 512, 3)
  context, image_context, timestep_proj, temb, (cos, sin), blocks, sample = _stages(
      model, *(jnp.asarray(a) for a in inputs))
  x, t, text, image = (torch.from_numpy(a) for a in inputs)
  with torch.no_grad():
    ref_temb, ref_proj, ref_text, ref_image = tm.condition_embedder(t, text, image)
    ref_proj = ref_proj.unflatten(1, (6, -1))
    rotary = tm.rope(x)
    ref_blocks = [tm.patch_embedding(x).flatten(2).transpose(1, 2)]
    for block in tm.blocks:  # diffusers' blocks take the image tokens before the text
      ref_blocks.append(block(ref_blocks[-1], torch.cat([ref_image, ref_text], 1), ref_proj,
                              rotary))

  def close(a, b):
    b = b.numpy()
    np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max())

  close(context, ref_text)
  close(image_context, ref_image)
  close(timestep_proj, ref_proj)
  close(temb, ref_temb)
  close(cos, rotary[0][0, :, 0])  # diffusers: (1, tokens, 1, head_dim)
  close(sin, rotary[1][0, :, 0])
  for ours, ref in zip(blocks, ref_blocks, strict=True):
    close(ours, ref)
  rel = np.abs(np.asarray(sample) - (ref := _reference(tm, *inputs))).max() / np.abs(ref).max()
  assert rel <= 1e-4


def test_every_linear_is_a_project_linear_named_like_diffusers():
  """Quantization rules find layers by path: each diffusers Linear/Conv has a Flax `Linear` twin."""
  tm = make_torch_wan(**I2V, pos_embed_seq_len=8)
  model = abstract_model(WanConfig.from_dict(dict(tm.config)))
  ours = {torch_key(f"{path}.kernel").removesuffix(".weight") for path, _ in iter_linears(model)}
  theirs = {name for name, m in tm.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))}
  assert ours == theirs


def test_quantized_blocks_keep_the_output_close(tmp_path):
  """The project's quantization rules find Wan's layers by path; W8A8 blocks stay close."""
  tm = make_torch_wan(seed=3, num_layers=1)
  tm.save_pretrained(tmp_path)
  model = load_pretrained(str(tmp_path))
  blocks = {p for p, _ in iter_linears(model) if p.startswith("blocks.")}
  keep = (r"^patch_embedding$", r"^condition_embedder\.", r"^proj_out$")
  infos = quantize_model(model, make_rules(8, 8, keep_fp=keep))
  freeze_all(model)
  assert {i.path for i in infos if i.quantized} == blocks and len(blocks) == 10
  inputs = _inputs(dict(tm.config), 1, 3, 4, 4, 5)
  ref, out = _reference(tm, *inputs), _run(model, *inputs)
  assert 1e-4 < np.abs(out - ref).max() / np.abs(ref).max() < 0.05


def test_bfloat16_forward_close_to_float32(tmp_path):
  tm = make_torch_wan(seed=4, num_layers=1)
  tm.save_pretrained(tmp_path)
  model = load_pretrained(str(tmp_path), jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in flat_params(model).values())
  inputs = _inputs(dict(tm.config), 1, 3, 4, 4, 5)
  out = _forward(model, *(jnp.asarray(a) for a in inputs[:3]))
  assert out.dtype == jnp.bfloat16
  ref = _reference(tm, *inputs)
  assert np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max() < 0.05


# --- conversion ---------------------------------------------------------------------------


@pytest.fixture
def wan_dir(tmp_path):
  """An image-to-video model with learned image positions: every kind of parameter Wan has."""
  tm = make_torch_wan(seed=5, **I2V, pos_embed_seq_len=8)
  tm.save_pretrained(tmp_path / "hf")
  return tmp_path / "hf", tm


def test_round_trip_diffusers_flax_diffusers_is_exact(wan_dir, tmp_path):
  src, tm = wan_dir
  assert diffusers_to_flax.main(["--src", str(src), "--dst", str(tmp_path / "flax"),
                                 "--dtype", "float32"]) == 0
  converted = load_pretrained(str(tmp_path / "flax"))
  assert converted.config == WanConfig.from_dict(dict(tm.config))
  assert flax_to_diffusers.main(["--src", str(tmp_path / "flax"), "--dst",
                                 str(tmp_path / "hf2")]) == 0
  # from_pretrained needs `accelerate` for Wan (fp32-kept modules); build it from the exported
  # config.json and load the exported weights strictly instead.
  back = diffusers.WanTransformer3DModel.from_config(
      diffusers.WanTransformer3DModel.load_config(tmp_path / "hf2"))
  back.load_state_dict(safetensors_torch.load_file(tmp_path / "hf2" / WEIGHTS), strict=True)
  assert WanConfig.from_dict(dict(back.config)) == converted.config
  a, b = tm.state_dict(), back.state_dict()
  assert a.keys() == b.keys()
  assert all(torch.equal(a[k], b[k]) for k in a)
  x, y = flat_params(converted), flat_params(load_pretrained(str(tmp_path / "hf2")))
  assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_sharded_checkpoint_loads(wan_dir, tmp_path):
  src, tm = wan_dir
  tm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert (tmp_path / "sharded" / f"{WEIGHTS}.index.json").exists()
  a, b = flat_params(load_pretrained(str(src))), flat_params(load_pretrained(str(tmp_path / "sharded")))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sizes", [
    dict(num_attention_heads=12, ffn_dim=8960),  # Wan 2.1 T2V 1.3B
    dict(image_dim=1280, added_kv_proj_dim=5120, pos_embed_seq_len=514),  # Wan 2.1 FLF2V 14B
])
def test_real_sizes_map_key_for_key(sizes):
  """Released Wan 2.1 sizes (one block: the others repeat it), on torch's meta device."""
  with torch.device("meta"):
    tm = diffusers.WanTransformer3DModel(**sizes, num_layers=1)
  cfg = WanConfig(**sizes, num_layers=1)
  ours = {torch_key(p): torch_shape(p, s, cfg)
          for p, (s, _) in param_shapes(abstract_model(cfg)).items()}
  assert ours == {k: tuple(v.shape) for k, v in tm.state_dict().items()}


def _edit_weights(folder, edit):
  tensors = load_file(folder / WEIGHTS)
  edit(tensors)
  save_file(tensors, folder / WEIGHTS)


def test_key_problems_are_listed_together(wan_dir):
  src, _ = wan_dir

  def edit(t):
    del t["proj_out.bias"]
    del t["blocks.1.attn2.add_k_proj.weight"]
    t["extra.weight"] = np.zeros(3, np.float32)
    t["blocks.0.scale_shift_table"] = np.zeros((1, 5, 24), np.float32)

  _edit_weights(src, edit)
  with pytest.raises(CheckpointError) as e:
    load_pretrained(str(src))
  for fragment in ["missing keys", "proj_out.bias", "blocks.1.attn2.add_k_proj.weight",
                   "unexpected keys", "extra.weight", "mis-shaped",
                   "blocks.0.scale_shift_table (1, 5, 24) (expected (1, 6, 24))"]:
    assert fragment in str(e.value)


def test_keys_diffusers_ignores_are_ignored(wan_dir):
  src, _ = wan_dir
  before = flat_params(load_pretrained(str(src)))
  _edit_weights(src, lambda t: t.update({"blocks.0.attn2.norm_added_q.weight":
                                         np.ones(24, np.float32)}))
  after = flat_params(load_pretrained(str(src)))
  assert all(np.array_equal(before[k], after[k]) for k in before)


# --- bad configs and inputs ---------------------------------------------------------------


@pytest.mark.parametrize("fields,match", [
    (dict(frobnicate=1), "frobnicate"),
    (dict(qk_norm="layer_norm"), "qk_norm"),
    (dict(qk_norm=None), "rms_norm_across_heads"),
    (dict(patch_size=[1, 2]), "patch_size"),
    (dict(attention_head_dim=7), "even"),
    (dict(image_dim=12), "set together"),
    (dict(image_dim=12, added_kv_proj_dim=16), "must equal the hidden size"),
    (dict(pos_embed_seq_len=8), "image_dim is null"),
    (dict(_class_name="CogVideoXTransformer3DModel"), "not WanTransformer3DModel"),
])
def test_unsupported_configs_are_named(fields, match):
  with pytest.raises(UnsupportedConfigError, match=match):
    WanConfig.from_dict({**TINY, **fields})


def _write_config(folder, config):
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(config))


def test_unknown_class_name_lists_supported_models(tmp_path):
  _write_config(tmp_path / "m", {"_class_name": "LatteTransformer3DModel"})
  with pytest.raises(UnsupportedConfigError, match="WanTransformer3DModel"):
    load_pretrained(str(tmp_path / "m"))


def test_missing_fields_are_warned_about():
  config = {k: v for k, v in WanConfig(**TINY).to_dict().items()
            if k not in ("eps", "pos_embed_seq_len")}
  with pytest.warns(MissingConfigFieldWarning, match=r"no eps: taking diffusers' default eps=1e-06"):
    assert WanConfig.from_diffusers(config, "config.json").eps == 1e-6


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("i2v")
  make_torch_wan(num_layers=1, **I2V).save_pretrained(path)
  return load_pretrained(str(path))


@pytest.mark.parametrize("shapes,match", [
    (dict(x=(1, 3, 3, 4, 4)), r"hidden_states must be \(B, 4, F, H, W\)"),
    (dict(x=(1, 4, 3, 5, 4)), "multiples of patch_size"),
    (dict(t=(1, 7)), "per-token timesteps"),
    (dict(t=(3,)), r"timestep must be a scalar or \(1,\)"),
    (dict(text=(1, 512, 15)), r"encoder_hidden_states must be \(1, L, 16\)"),
    (dict(text=(1, 20, 16)), "padded to 512"),
    (dict(image=(1, 5, 11)), r"encoder_hidden_states_image must be \(1, L_img, 12\)"),
    (dict(x=(1, 4, 3, 4, 68)), "rope_max_seq_len=32"),
])
def test_wrong_input_shapes_are_explained(i2v_model, shapes, match):
  s = {**dict(x=(1, 4, 3, 4, 4), t=(1,), text=(1, 512, 16), image=(1, 5, 12)), **shapes}
  with pytest.raises(ValueError, match=match):
    i2v_model(*(jnp.zeros(s[k]) for k in ("x", "t", "text", "image")))


def test_image_input_to_a_text_to_video_model_is_explained(tmp_path):
  make_torch_wan(num_layers=1).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="text-to-video model"):
    load_pretrained(str(tmp_path))(jnp.zeros((1, 4, 1, 4, 4)), jnp.zeros((1,)),
                                   jnp.zeros((1, 5, 16)), jnp.zeros((1, 3, 12)))


def test_quantization_job_refuses_image_to_video_models(wan_dir):
  from s2q_jax import job, job_config  # pylint: disable=import-outside-toplevel
  from s2q_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  cfg = job_config.base_config(4, 6, "rtn")
  cfg.model.path = str(wan_dir[0])  # image-to-video: the job has no image conditions
  with pytest.raises(UserError, match="image-to-video Wan model"):
    job.load_model(cfg)
