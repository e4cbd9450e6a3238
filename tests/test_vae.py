"""The Flax CogVideoX VAE decoder against diffusers' `AutoencoderKLCogVideoX.decode`."""
import copy
import json
import shutil

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conversion.checkpoint_files import CheckpointError
from s2q_jax.models import CogVideoXVAEConfig, Tiling, UnsupportedConfigError, load_vae
from s2q_jax.models.params import flat_params
from s2q_jax.models.vae import _decode_batch, frame_batches
from s2q_jax.models.vae_loading import abstract_vae
from s2q_jax.models.vae_memory import decode_memory, decoded_frames

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
WEIGHTS = "diffusion_pytorch_model.safetensors"

# (diffusers config, latents (batch, frames, height, width)). The frame counts make frame
# batches of 3 + 2, 2 + 2 + 2 and a single image. Every compiled frame batch costs about
# two CPU seconds, so the models are small and few.
CONFIGS = {
    "2_blocks_time_x2": (dict(block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
                              norm_num_groups=4, temporal_compression_ratio=2), (2, 5, 4, 6)),
    "3_blocks_time_x4": (dict(block_out_channels=(8, 8, 16), latent_channels=3, layers_per_block=0,
                              norm_num_groups=2, temporal_compression_ratio=4), (1, 6, 3, 5)),
    "4_blocks_time_x8_mish_image": (dict(block_out_channels=(4, 4, 4, 8), latent_channels=2,
                                         layers_per_block=0, norm_num_groups=2, act_fn="mish",
                                         temporal_compression_ratio=8), (1, 1, 2, 2)),
    # diffusers' enable_tiling() defaults (tiles of half the sample size, overlaps 1/6 and
    # 1/5) on 14 × 12 latents: 2 × 2 tiles of unequal sizes, blended over 4 pixels.
    "tiled": (dict(block_out_channels=(4, 8), latent_channels=2, layers_per_block=0,
                   norm_num_groups=2, temporal_compression_ratio=2, sample_height=48,
                   sample_width=40), (1, 3, 14, 12)),
}
PARITY = [name for name in CONFIGS if name != "tiled"]


def make_torch_vae(seed=0, perturb=0.2, **config):
  """A random diffusers VAE with every parameter perturbed (norms and biases start constant)."""
  torch.manual_seed(seed)
  blocks = len(config["block_out_channels"])
  model = diffusers.AutoencoderKLCogVideoX(
      down_block_types=("CogVideoXDownBlock3D",) * blocks,
      up_block_types=("CogVideoXUpBlock3D",) * blocks, **config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * perturb)
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name → (diffusers folder, diffusers model, latents); each saved once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      config, (batch, frames, height, width) = CONFIGS[name]
      model = make_torch_vae(**config)
      path = tmp_path_factory.mktemp(name)
      model.save_pretrained(path)
      z = torch.randn(batch, config["latent_channels"], frames, height, width,
                      generator=torch.Generator().manual_seed(1))
      cache[name] = path, model, z
    return cache[name]

  return get


def _relative_error(out, ref):
  return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", PARITY)
def test_decode_matches_diffusers(name, saved):
  path, torch_vae, z = saved(name)
  with torch.no_grad():
    ref = torch_vae.decode(z).sample.numpy()
  vae = load_vae(path)
  _decode_batch.clear_cache()  # count this decode's programs only
  out = vae.decode(z.numpy())
  assert out.shape == ref.shape
  assert ref.shape[2] == decoded_frames(vae.config, z.shape[2])
  assert _relative_error(out, ref) <= 1e-4
  # One program per kind of frame batch (the first, without a cache; the rest, with one),
  # however many batches there are: the video is never one graph.
  assert _decode_batch._cache_size() == min(len(frame_batches(z.shape[2])), 2)


def test_tiled_decode_matches_diffusers(saved):
  path, torch_vae, z = saved("tiled")
  with torch.no_grad():
    untiled = torch_vae.decode(z).sample.numpy()
    torch_vae.enable_tiling()
    try:
      ref = torch_vae.decode(z).sample.numpy()
    finally:
      torch_vae.disable_tiling()
  assert _relative_error(ref, untiled) > 1e-3  # tiling changes the function: it is exercised
  out = load_vae(path).decode(z.numpy(), tiling=True)
  assert out.shape == ref.shape
  assert _relative_error(out, ref) <= 1e-4


def test_bfloat16_decode_stays_close_to_float32(saved):
  path, _, z = saved("4_blocks_time_x8_mish_image")
  reference = np.asarray(load_vae(path).decode(z.numpy()))
  out = load_vae(path, dtype=jnp.bfloat16).decode(z.numpy())
  assert out.dtype == jnp.bfloat16
  assert _relative_error(out.astype(jnp.float32), reference) <= 3e-2


def test_stored_dtype_is_kept_unless_asked(saved, tmp_path):
  _, torch_vae, _ = saved("2_blocks_time_x2")
  copy.deepcopy(torch_vae).to(torch.bfloat16).save_pretrained(tmp_path)
  dtypes = lambda vae: {p.dtype for p in jax.tree.leaves(nnx.state(vae, nnx.Param))}  # noqa: E731
  assert dtypes(load_vae(tmp_path)) == {jnp.dtype("bfloat16")}
  assert dtypes(load_vae(tmp_path, dtype=jnp.float32)) == {jnp.dtype("float32")}


def test_sharded_checkpoint_loads_the_same_weights(saved, tmp_path):
  path, torch_vae, _ = saved("2_blocks_time_x2")
  torch_vae.save_pretrained(tmp_path, max_shard_size="20KB")
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  single, sharded = flat_params(load_vae(path)), flat_params(load_vae(tmp_path))
  assert single.keys() == sharded.keys()
  assert all(np.array_equal(single[k], sharded[k]) for k in single)


def _largest_intermediate(jaxpr) -> int:
  largest = 0
  for eqn in jaxpr.eqns:
    largest = max([largest] + [v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars])
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax_core.ClosedJaxpr):
          largest = max(largest, _largest_intermediate(sub.jaxpr))
        elif isinstance(sub, jax_core.Jaxpr):
          largest = max(largest, _largest_intermediate(sub))
  return largest


def _traced_first_batch(vae, latent_shape) -> tuple[int, int]:
  """Bytes of the largest array in the program of the first (largest) frame batch, and of the
  conv cache it returns; nothing runs."""
  batch, channels, frames, height, width = latent_shape
  start, end = frame_batches(frames)[0]
  graphdef, state = nnx.split(vae)
  z = jax.ShapeDtypeStruct((batch, end - start, height, width, channels), jnp.float32)
  jaxpr, (_, cache) = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s).decoder(x),
                                     return_shape=True)(state, z)
  return (_largest_intermediate(jaxpr.jaxpr),
          sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)))


@pytest.mark.parametrize("name", ["2_blocks_time_x2", "3_blocks_time_x4"])
def test_decode_memory_matches_traced_program_and_checkpoint(name, saved):
  path, torch_vae, z = saved(name)
  vae = load_vae(path)
  estimate = decode_memory(vae.config, tuple(z.shape))
  traced = _traced_first_batch(vae, tuple(z.shape))
  assert (estimate.largest_activation, estimate.conv_cache) == traced
  decoder = [v for k, v in torch_vae.state_dict().items() if k.startswith("decoder.")]
  assert estimate.weights == 4 * sum(v.numel() for v in decoder)
  with torch.no_grad():
    assert estimate.output == 4 * torch_vae.decode(z).sample.numel()


@pytest.mark.parametrize("tiled", [False, True])
def test_decode_memory_at_cogvideox_size_matches_traced_program(tiled):
  cfg = CogVideoXVAEConfig()  # the VAE of CogVideoX-2B and 5B; 49 frames at 480 × 720
  tiling = Tiling.default(cfg) if tiled else None
  latent_shape = (1, 16, 13, 60, 90)
  estimate = decode_memory(cfg, latent_shape, tiling=tiling)
  if tiled:  # diffusers' first tile is the largest
    tile_h, tile_w = tiling.sample_min_height // 8, tiling.sample_min_width // 8
    latent_shape = (*latent_shape[:3], tile_h, tile_w)
  assert (estimate.largest_activation, estimate.conv_cache) == _traced_first_batch(
      abstract_vae(cfg), latent_shape)
  assert decoded_frames(cfg, 13) == 49


@pytest.fixture
def small_dir(saved, tmp_path):
  """A private copy of a saved VAE folder, to damage."""
  shutil.copytree(saved("2_blocks_time_x2")[0], tmp_path, dirs_exist_ok=True)
  return tmp_path


def test_missing_unexpected_and_misshaped_keys_are_named(small_dir):
  tensors = load_file(small_dir / WEIGHTS)
  del tensors["decoder.norm_out.conv_b.conv.bias"]
  tensors["decoder.conv_out.conv.weight"] = tensors["decoder.conv_out.conv.weight"][:, :4]
  tensors["decoder.mid_block.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, small_dir / WEIGHTS)
  with pytest.raises(CheckpointError) as e:
    load_vae(small_dir)
  message = str(e.value)
  assert "missing keys: decoder.norm_out.conv_b.conv.bias" in message
  assert "unexpected keys: decoder.mid_block.extra.weight" in message
  assert "mis-shaped keys: decoder.conv_out.conv.weight (3, 4, 3, 3, 3)" in message
  assert "encoder." not in message  # the encoder half is present and ignored


def test_non_finite_weights_are_named(small_dir):
  tensors = load_file(small_dir / WEIGHTS)
  tensors["decoder.up_blocks.1.resnets.0.conv2.conv.bias"][0] = np.nan
  save_file(tensors, small_dir / WEIGHTS)
  with pytest.raises(CheckpointError, match=r"up_blocks\.1\.resnets\.0\.conv2\.conv\.bias"):
    load_vae(small_dir)


def test_wrong_latents_are_refused_with_the_expected_layout(small_dir):
  vae = load_vae(small_dir)
  with pytest.raises(ValueError, match=r"expects latents \(batch, 4 channels.*transpose"):
    vae.decode(np.zeros((1, 5, 4, 4, 6), np.float32))  # transformer layout (B, F, C, h, w)
  with pytest.raises(ValueError, match=r"shape \(4, 5, 4, 6\)$"):
    vae.decode(np.zeros((4, 5, 4, 6), np.float32))
  with pytest.raises(ValueError, match=r"shape \(1, 4, 0, 4, 6\)$"):
    vae.decode(np.zeros((1, 4, 0, 4, 6), np.float32))
  with pytest.raises(ValueError, match="overlap factors below 1"):
    vae.decode(np.zeros((1, 4, 1, 4, 6), np.float32), tiling=Tiling(4, 4, 0.9, 0.9))


def test_folders_that_are_not_a_vae_are_refused(tmp_path):
  (tmp_path / "vae").mkdir()
  (tmp_path / "vae" / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match="pass .*vae"):
    load_vae(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
  with pytest.raises(UnsupportedConfigError, match="'vae' sub-folder"):
    load_vae(tmp_path)


@pytest.mark.parametrize("fields, message", [
    (dict(use_post_quant_conv=True), "use_post_quant_conv"),
    (dict(block_out_channels=(8, 12), norm_num_groups=8), r"\[12\] are not multiples"),
    (dict(temporal_compression_ratio=3), "power of two"),
    (dict(act_fn="tanh"), "act_fn='tanh'"),
    (dict(up_block_types=["UpDecoderBlock2D"] * 4), "only 'CogVideoXUpBlock3D'"),
    (dict(tile_size=4), "not supported: tile_size"),
])
def test_unsupported_configs_are_refused(fields, message):
  with pytest.raises(UnsupportedConfigError, match=message):
    CogVideoXVAEConfig.from_dict(fields)
