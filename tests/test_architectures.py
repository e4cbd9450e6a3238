"""Every method on every architecture (CogVideoX, Wan 2.1, HunyuanVideo), through the main job.

Each run starts from a tiny random model saved as a diffusers folder, calibrates,
exports, reloads the export on the reference kernels and generates from it; the
reloaded model must compute what the in-memory fake-quantized model computes.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conversion.flax_to_diffusers import save_diffusers
from s2q_jax import compare, job
from s2q_jax.job_config import base_config
from s2q_jax.methods import METHODS
from s2q_jax.models import (CogVideoXConfig, CogVideoXTransformer3D, HunyuanVideoConfig,
                            HunyuanVideoTransformer3D, WanConfig, WanTransformer3D, interface)
from s2q_jax.quant import quantized_layers

ARCHITECTURES = {
    "cogvideox": (CogVideoXTransformer3D, CogVideoXConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=5, patch_size=2, max_text_seq_length=6,
        use_rotary_positional_embeddings=True)),
    "wan": (WanTransformer3D, WanConfig(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=32)),
    "hunyuan_video": (HunyuanVideoTransformer3D, HunyuanVideoConfig(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))),
}


def _num_blocks(config) -> int:
  return config.num_layers + getattr(config, "num_single_layers", 0)
TINY = {"eval.num_videos": 2, "eval.frames": 2, "eval.height": 8, "eval.width": 8,
        "sampler.num_steps": 3, "calib.num_prompts": 2, "calib.num_samples": 4,
        "distill.epochs": 1, "distill.batch_size": 2, "q_vdit.epochs": 1,
        "compilation_cache": ""}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model_dir(request, tmp_path_factory):
  """A diffusers folder of a tiny random model, every parameter perturbed off its init."""
  model_type, config = ARCHITECTURES[request.param]
  model = model_type(config, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  folder = tmp_path_factory.mktemp(request.param) / "transformer"
  save_diffusers(model, str(folder))
  return request.param, str(folder)


def _config(method: str, folder: str, workdir: str):
  cfg = base_config(4, 6, method)
  cfg.model.path, cfg.workdir = folder, workdir
  cfg.inference.backend = "reference"  # quantized videos from the reloaded export
  for key, value in TINY.items():
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_exports_and_reloads(model_dir, method, tmp_path, monkeypatch):
  arch, folder = model_dir
  seen = {}
  deployed = job._deployed

  def spy(model, export_dir, backend):
    cm = deployed(model, export_dir, backend)
    seen["fake_quant"] = model
    seen["deployed"] = cm.__enter__()
    return _Yield(seen["deployed"], cm)
  monkeypatch.setattr(job, "_deployed", spy)
  report = job.run(_config(method, folder, str(tmp_path / method)))

  assert report["method"] == method and np.isfinite(report["metrics"]["psnr"])
  assert report["layers"]["quantized"], "no layer was quantized"
  assert os.path.exists(os.path.join(report["checkpoint"], "config.json"))
  # HunyuanVideo embeds the guidance scale: no null-prompt pass, so no null-prompt twins.
  embedded = arch == "hunyuan_video"
  assert report["eval"]["classifier_free_scale"] == (1.0 if embedded else 5.0)
  if method != "rtn":
    assert report["calibration"]["selection"]["uncond"] == (0 if embedded else 2)
  fake, reloaded = seen["fake_quant"], seen["deployed"]
  assert type(reloaded) is type(fake)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 2, 4, 8, 8)), jnp.float32)
  c = jnp.asarray(fake.apply_guidance(*fake.stand_in_conditions(rng, 2), 5.0)[0])
  t = jnp.asarray([900, 100])
  fq, out = np.asarray(_denoise(fake, x, c, t)), np.asarray(_denoise(reloaded, x, c, t))
  # Same integer codes and scales; only the order of float operations differs. That can flip
  # a dynamic activation code at a rounding boundary (one flip in an adaLN modulation, which
  # acts on one vector per video, moves every token a little): most outputs agree to float32
  # rounding, none by more than a few percent.
  err, peak = np.abs(out - fq), float(np.abs(fq).max())
  assert float(np.median(err)) <= 1e-5 * peak and float(err.max()) <= 0.05 * peak, (arch, err.max())


@nnx.jit
def _denoise(model, x, c, t):
  return model.denoise(x, c, t)  # eager, a tiny model's forward takes seconds of dispatch


class _Yield:
  """A context manager yielding `value` and closing `inner` (the spied `_deployed`)."""

  def __init__(self, value, inner):
    self.value, self.inner = value, inner

  def __enter__(self):
    return self.value

  def __exit__(self, *exc):
    return self.inner.__exit__(*exc)


def test_every_architecture_implements_the_model_interface():
  for model_type, config in ARCHITECTURES.values():
    model = interface.check(model_type(config, rngs=nnx.Rngs(0)))
    names = [name for name, _ in model.calibration_blocks()]
    assert len(names) == _num_blocks(config)
    for name, block in model.calibration_blocks():
      assert hasattr(block, "calibration_call") and hasattr(block, "self_attention_qk"), name
      assert all(model.layer_tokens(f"{name}.{path}") in ("stream", "video", "context")
                 for path, _ in _linears(block))


def _linears(block):
  from s2q_jax.quant.apply import iter_linears  # pylint: disable=import-outside-toplevel
  return list(iter_linears(block))


def test_block_states_have_the_declared_layout():
  """embed_blocks → every block's calibration_call keeps the stream's shapes and layout."""
  rng = np.random.default_rng(0)
  for model_type, config in ARCHITECTURES.values():
    model = model_type(config, rngs=nnx.Rngs(3))
    x = jnp.asarray(rng.standard_normal((2, 2, 4, 8, 8)), jnp.float32)
    c = jnp.asarray(model.apply_guidance(*model.stand_in_conditions(rng, 2), 5.0)[0])
    length = c.shape[1]
    t = jnp.asarray([700, 20])
    state = model.embed_blocks(x, c, t)
    extras = model.block_extras(2, 8, 8)
    stream = state.stream
    for _, block in model.calibration_blocks():
      stream = block.calibration_call(stream, state.context, extras)
      assert [a.shape for a in stream] == [a.shape for a in state.stream]
    n_lead, frames = model.stream_layout(2, length)
    tokens = jnp.concatenate(stream, axis=1)
    assert frames == 2 and (tokens.shape[1] - n_lead) % frames == 0
    for _, block in model.calibration_blocks():
      q, k, valid = block.self_attention_qk(state.stream, state.context, extras)
      assert q.shape[2] == k.shape[2] == jnp.concatenate(state.stream, axis=1).shape[1]
      assert valid is None or valid.shape == (2, k.shape[2])
    assert _denoise(model, x, c, t).shape == x.shape


def test_compare_runs_on_a_model_folder(model_dir, tmp_path):
  arch, folder = model_dir
  sets = [f"model.path={folder}"] + [f"{k}={v!r}" for k, v in TINY.items()]
  argv = ["--methods", "rtn,qvd", "--bits", "w4a6", "--seeds", "0", "--workdir",
          str(tmp_path)] + [a for s in sets for a in ("--set", s)]
  assert compare.main(argv) == 0, arch
  table = open(tmp_path / "comparison.md").read()
  assert "| W4A6 | rtn | 1 |" in table and "| W4A6 | qvd | 1 |" in table


def test_compare_refuses_unknown_settings(tmp_path, capsys):
  with pytest.raises(SystemExit):
    compare.main(["--workdir", str(tmp_path), "--set", "model.nonsense=1"])
  assert "config key" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    compare.main(["--workdir", str(tmp_path), "--set", "seed=3"])
  assert "--seeds" in capsys.readouterr().err
