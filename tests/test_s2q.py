"""S²Q-VDiT calibration on a tiny model: runs, deploys, is deterministic, shards, resumes."""
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax import deploy, quant
from s2q_jax.calibration.pool import build_pool
from s2q_jax.job_config import base_config
from s2q_jax.methods import s2q
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D
from s2q_jax.pretrained import load_pretrained

CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                      time_embed_dim=32, text_embed_dim=16, num_layers=2, sample_width=8,
                      sample_height=8, sample_frames=5, patch_size=4, max_text_seq_length=4,
                      use_rotary_positional_embeddings=True)


def _job_config(rotation=False, **calib):
  cfg = base_config(4, 6, "s2q")
  cfg.sampler.guidance_scale = 2.0  # the pool's; the job fills it in when unset
  cfg.distill.rotation = rotation
  cfg.calib.num_prompts, cfg.calib.num_samples = 2, 4
  cfg.distill.epochs, cfg.distill.batch_size = 2, 2
  for k, v in calib.items():
    cfg.calib[k] = v
  return cfg


def _setup():
  fp = CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  cond = rng.standard_normal((2, 4, 16)).astype(np.float32)
  noise = rng.standard_normal((2, 2, 3, 8, 8)).astype(np.float32)
  pool = build_pool(fp, cond, np.zeros((4, 16), np.float32), noise, num_steps=3,
                    guidance_scale=2.0)
  q = nnx.clone(fp)
  quant.quantize_model(q, quant.make_rules(4, 6))
  deploy.round_fp_params(q)  # as the main job does: the checkpoint stores these in bf16
  return fp, q, pool


def _calibrate(workdir, log=lambda *_: None, rotation=False, **calib):
  fp, q, pool = _setup()
  mesh = jax.make_mesh((1,), ("data",))
  stats = s2q.calibrate(q, fp, pool, _job_config(rotation, **calib), str(workdir), mesh, log=log)
  return fp, q, stats


def _codes(model):
  return {p: np.asarray(l.codes[...]) for p, l in quant.quantized_layers(model)}


def test_pool_keeps_every_step():
  _, _, pool = _setup()
  assert len(pool) == 2 * 3
  assert pool.latents.shape == (6, 2, 3, 8, 8)
  # x_{t-1} of one step is x_t of the next.
  np.testing.assert_array_equal(pool.previous[:2], pool.latents[2:4])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
  """One uninterrupted calibration, shared by the tests below (calibration is slow on CPU)."""
  return _calibrate(tmp_path_factory.mktemp("calibrated"))


def test_blocks_share_one_compiled_training_step(tmp_path, monkeypatch, caplog):
  """Blocks of one structure reuse the jitted step, compiled once for the whole model and
  not once per block (compiling dominated the default job's calibration)."""
  from s2q_jax.distillation import block_reconstruction  # pylint: disable=import-outside-toplevel
  make_step = block_reconstruction._train_step  # pylint: disable=protected-access
  make_step.cache_clear()
  steps = []

  def spy(*args):
    txs, step = make_step(*args)
    steps.append(step)
    return txs, step
  monkeypatch.setattr(block_reconstruction, "_train_step", spy)
  caplog.set_level(logging.WARNING)
  with jax.log_compiles(True):
    _calibrate(tmp_path)
  assert len(steps) == CFG.num_layers and all(s is steps[0] for s in steps)
  compiled = [r for r in caplog.records if "XLA compilation of jit(step)" in r.getMessage()]
  assert len(compiled) == 1


def test_calibration_runs_freezes_and_is_deterministic(calibrated, tmp_path):
  _, q1, stats = calibrated
  assert len(stats["blocks"]) == 2 and len(stats["selection"]["positions"]) == 2
  assert sum(stats["selection"]["step_histogram"]) == 4 and stats["selection"]["uncond"] == 2
  assert all(layer.codes is not None for _, layer in quant.quantized_layers(q1))
  _, q2, _ = _calibrate(tmp_path / "again")
  c1, c2 = _codes(q1), _codes(q2)
  assert all(np.array_equal(c1[k], c2[k]) for k in c1)


def test_every_learned_part_is_learned(calibrated):
  """Weight and activation clipping, smoothing and the Kronecker transform all moved."""
  _, q, _ = calibrated
  layers = [l for _, l in quant.quantized_layers(q)]
  moved = lambda values, start: any(not np.allclose(v, start) for v in values)  # noqa: E731
  assert moved([l.clip[...] for l in layers], 1.0)
  assert moved([l.act_clip[...] for l in layers], 1.0)
  assert moved([l.smooth[...] for l in layers], 1.0)
  assert moved([l.transform_left[...] - np.eye(l.transform_left.shape[0]) for l in layers], 0.0)
  assert moved([l.transform_right[...] - np.eye(l.transform_right.shape[0]) for l in layers],
               0.0)


@pytest.mark.parametrize("rotation", [False, True])
def test_learned_parts_fold_into_the_deployed_checkpoint(calibrated, tmp_path, rotation):
  fp, q, _ = _calibrate(tmp_path / "rotated", rotation=True) if rotation else calibrated
  if rotation:
    assert all(layer.rotation is not None for _, layer in quant.quantized_layers(q))
  deploy.export_quantized(q, str(tmp_path / "export"))
  deployed = load_pretrained(str(tmp_path / "export"), backend="reference")
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((1, 2, 3, 8, 8)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((1, 4, 16)), jnp.float32)
  t = jnp.array([400])
  ref, fq, out = fp(x, c, t), q(x, c, t), deployed(x, c, t)
  # The same integer arithmetic on the same stored values: equal up to float rounding.
  assert float(jnp.linalg.norm(out - fq)) < 1e-3 * float(jnp.linalg.norm(fq - ref))


def _block_chain(model, fp, data):
  """Each block's (text; video) output when `model`'s blocks run on the calibration inputs,
  embedded by the full-precision model (as calibration feeds every block)."""
  video, text, temb = fp.embed(data.latents, data.conditions, data.timesteps)
  rotary = fp.rotary_embedding(*data.latents.shape[1:2], *data.latents.shape[3:])
  outs = []
  for block in model.transformer_blocks:
    video, text = block(video, text, temb, rotary)
    outs.append(np.concatenate([np.asarray(text), np.asarray(video)], axis=1))
  return outs


def test_each_block_reconstructs_better_than_round_to_nearest(calibrated):
  """On the calibration inputs, every calibrated block is closer to its full-precision
  target than round-to-nearest is; the report's per-block errors are the real ones."""
  fp, q, stats = calibrated
  _, rtn, pool = _setup()
  quant.freeze_all(rtn)
  data = pool.model_inputs(np.asarray(stats["selection"]["positions"]), True)
  fp_out = _block_chain(fp, fp, data)
  rtn_out, s2q_out = _block_chain(rtn, fp, data), _block_chain(q, fp, data)
  for b, target in enumerate(fp_out):
    s2q_err = np.mean((s2q_out[b] - target) ** 2)
    assert s2q_err < np.mean((rtn_out[b] - target) ** 2), b
  # The report's error of the last block compares the same two chains (computed in other
  # batches there, so a few activation codes may round the other way).
  assert stats["blocks"][-1]["output_mse_after_freeze"] == pytest.approx(
      np.mean((s2q_out[-1] - fp_out[-1]) ** 2), rel=2e-2)


def test_gptq_codes_beat_round_to_nearest_for_the_learned_scales(calibrated):
  """What GPTQ is for: lower layer output error on the calibration inputs, same scales."""
  from s2q_jax.calibration.capture import recording  # pylint: disable=import-outside-toplevel
  fp, q, stats = calibrated
  data = _setup()[2].model_inputs(np.asarray(stats["selection"]["positions"]), True)
  video, text, temb = fp.embed(data.latents, data.conditions, data.timesteps)
  block = q.transformer_blocks[0]
  layers = quant.quantized_layers(block)
  with recording(block, {p for p, _ in layers}) as collect:
    block(video, text, temb, fp.rotary_embedding(2, 8, 8))
    inputs = collect()
  gptq_err = rtn_err = 0.0
  for path, layer in layers:
    x = np.concatenate([np.asarray(v).reshape(-1, layer.in_features) for v in inputs[path]])
    w = np.asarray(layer.effective_kernel(), np.float64)
    scales = np.asarray(layer.scales[...], np.float64)
    rtn_codes = np.clip(np.round(w / scales), *quant.qrange(layer.w_bits))
    gptq_err += np.sum((x @ (w - np.asarray(layer.codes[...]) * scales)) ** 2)
    rtn_err += np.sum((x @ (w - rtn_codes * scales)) ** 2)
  assert gptq_err < 0.95 * rtn_err


def test_token_weights_are_the_full_precision_attention(tmp_path, monkeypatch):
  """λ of block 0 = min-max of the attention each token receives (dense softmax here)."""
  from s2q_jax.methods import blockwise  # pylint: disable=import-outside-toplevel
  seen = []

  def capture(block, data, *args, **kwargs):
    seen.append(data)
    raise KeyboardInterrupt  # one block is enough
  monkeypatch.setattr(blockwise, "train_block", capture)
  fp, q, pool = _setup()
  cfg = _job_config()
  with pytest.raises(KeyboardInterrupt):
    s2q.calibrate(q, fp, pool, cfg, str(tmp_path), jax.make_mesh((1,), ("data",)),
                  log=lambda *_: None)
  positions = s2q.select_positions(fp, pool, cfg, log=lambda *_: None)
  data = pool.model_inputs(positions, True)
  video, text, temb = fp.embed(data.latents, data.conditions, data.timesteps)
  block = fp.transformer_blocks[0]
  n_v, n_t, _, _ = block.norm1(video, text, temb)
  qh, kh, _ = block.attn1.project(jnp.concatenate([n_t, n_v], 1), text.shape[1],
                                  fp.rotary_embedding(2, 8, 8))
  d = qh.shape[-1]
  attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", qh, kh) / np.sqrt(d), axis=-1)
  received = np.asarray(attn.sum(axis=(1, 2)), np.float64)
  lo, hi = received.min(1, keepdims=True), received.max(1, keepdims=True)
  expected = 0.5 + 0.5 * (received - lo) / (hi - lo)
  np.testing.assert_allclose(seen[0].weights, expected, atol=1e-4)
  # Calibration inputs: the chosen steps' conditional inputs, then their null-prompt twins.
  half = len(data) // 2
  np.testing.assert_array_equal(data.latents[:half], data.latents[half:])
  np.testing.assert_array_equal(data.conditions[half:], np.zeros_like(data.conditions[half:]))


def test_smoothing_starts_from_smoothquant(tmp_path):
  """Without training, the smoothing of block 0's adaLN modulation is SmoothQuant's
  max|X|^½ / max|W|^½ over its calibration inputs silu(temb), computed here directly."""
  fp, q, pool = _setup()
  cfg = _job_config()
  cfg.distill.enabled = False
  stats = s2q.calibrate(q, fp, pool, cfg, str(tmp_path), jax.make_mesh((1,), ("data",)),
                        log=lambda *_: None)
  data = pool.model_inputs(np.asarray(stats["selection"]["positions"]), True)
  _, _, temb = fp.embed(data.latents, data.conditions, data.timesteps)
  x_max = np.abs(np.asarray(jax.nn.silu(temb))).max(0)
  w_max = np.abs(np.asarray(fp.transformer_blocks[0].norm1.linear.kernel[...])).max(1)
  expected = np.clip(np.sqrt(x_max) / np.sqrt(w_max), 1e-2, 1e2)
  np.testing.assert_allclose(q.transformer_blocks[0].norm1.linear.smooth[...], expected,
                             rtol=1e-5)


def test_resume_after_interruption_gives_the_same_result(calibrated, tmp_path):
  _, uninterrupted, _ = calibrated

  def die_after_first_block(message):
    if message.strip().startswith("block 1/"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _calibrate(tmp_path / "resumed", log=die_after_first_block)
  messages = []
  _, resumed, stats = _calibrate(tmp_path / "resumed", log=messages.append)
  assert any("resumed after block 1" in m for m in messages)
  assert [s["block"] for s in stats["blocks"]] == [1]
  a, b = _codes(uninterrupted), _codes(resumed)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_eight_devices_learn_what_one_device_learns():
  """Same global batch and seed on 1 and 8 host devices: same learned clipping."""
  script = textwrap.dedent(f"""
      import os, sys, json
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax, numpy as np
      from flax import nnx
      from test_s2q import _setup
      from s2q_jax.distillation.block_reconstruction import BlockData, TrainConfig, train_block
      from s2q_jax.quant import quantized_layers
      fp, q, pool = _setup()
      rng = np.random.default_rng(0)
      n, nv, nt, d = 8, 8, 4, 32
      video, text, temb, target_v, target_t = (rng.standard_normal(s).astype(np.float32) for s in
          [(n, nv, d), (n, nt, d), (n, 32), (n, nv, d), (n, nt, d)])
      data = BlockData((text, video), (temb,), (target_t, target_v), np.ones((n, nt + nv), np.float32))
      out = {{}}
      for devices in (1, 8):
        block = nnx.clone(q.transformer_blocks[0])
        mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
        train_block(block, data, None, TrainConfig(epochs=2, batch_size=8), mesh)
        out[devices] = np.concatenate([np.asarray(l.clip[...]) for _, l in quantized_layers(block)])
      print(json.dumps(float(np.abs(out[1] - out[8]).max())))
      """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5
