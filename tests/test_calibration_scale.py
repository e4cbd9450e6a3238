"""Calibration scales with depth: blocks after the first compile nothing and hold no more memory.

A real model has 30–60 blocks. Anything a block leaves behind (a program
traced again for its own closures or static attributes and kept alive in
JAX's caches, arrays kept in lists) grows the memory with every block, as
the embedded model's default job once did (+0.3 GiB per block).
"""
import dataclasses
import json

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
from s2q_jax.scale_plan import block_train_flops
from tiny import ONE_BLOCK

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
  """Three blocks calibrated, with what JAX traced after the first block was done."""
  fp = CogVideoXTransformer3D(dataclasses.replace(ONE_BLOCK, num_layers=3), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  pool = build_pool(fp, rng.standard_normal((2, 4, 16)).astype(np.float32),
                    np.zeros((4, 16), np.float32),
                    rng.standard_normal((2, 2, 3, 8, 8)).astype(np.float32),
                    num_steps=2, guidance_scale=2.0)
  q = nnx.clone(fp)
  quant.quantize_model(q, quant.make_rules(4, 6))
  deploy.round_fp_params(q)
  cfg = base_config(4, 6, "s2q")
  cfg.sampler.guidance_scale = 2.0  # the pool's; the job fills it in when unset
  cfg.calib.num_prompts, cfg.calib.num_samples = 2, 4
  cfg.distill.epochs, cfg.distill.batch_size = 2, 2

  traced, messages = [], []

  def on_trace(event, duration, **kwargs):
    del duration
    if event == TRACE_EVENT and any(m.strip().startswith("block 1/") for m in messages):
      traced.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(on_trace)
  try:
    stats = s2q.calibrate(q, fp, pool, cfg, str(tmp_path_factory.mktemp("w")),
                          jax.make_mesh((1,), ("data",)), log=messages.append)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_trace)
  return stats, traced, messages


def test_blocks_after_the_first_trace_nothing(calibration):
  _, traced, _ = calibration
  assert traced == [], f"traced again for later blocks: {sorted(set(traced))}"


def test_report_has_each_blocks_own_peak_memory_and_epoch_times(calibration):
  stats, _, messages = calibration
  blocks = stats["blocks"]
  assert [b["block"] for b in blocks] == [0, 1, 2]
  assert all(len(b["epoch_seconds"]) == 2 and min(b["epoch_seconds"]) > 0 for b in blocks)
  assert all(0 < sum(b["epoch_seconds"]) < b["seconds"] for b in blocks)
  # Blocks 2 and 3 do the same work with nothing new to compile: the same peak.
  peaks = [b["peak_rss_gib"] for b in blocks]
  assert abs(peaks[2] - peaks[1]) < 0.05, peaks
  assert all(b["peak_device_gib"] is None for b in blocks)  # CPU devices report none
  # Each block's log line says where it is and what is left; a log file gets plain lines.
  done = [m for m in messages if m.strip().startswith("block ")]
  assert len(done) == 3 and all("peak RSS" in m and "ETA" in m for m in done)
  assert done[-1].endswith("ETA 0:00")
  assert not any("\r" in m for m in messages)


@pytest.mark.parametrize("tokens,latent", [
    (None, (13, 60, 90)),  # the preset's video: 13 · 30 · 45 + 226 = 17,776 tokens
    (17_776, (13, 60, 90)),
    (1_576, (1, 60, 90)),  # one frame: 30 · 45 + 226
    (2_926, (2, 60, 90)),
    (226 + 45 * 10, (1, 20, 90)),  # ten rows of patches
])
def test_benchmark_latent_has_the_tokens_asked_for(tokens, latent):
  from s2q_jax.benchmark import PRESETS  # pylint: disable=import-outside-toplevel
  from s2q_jax.calibration_benchmark import latent_shape  # pylint: disable=import-outside-toplevel
  from s2q_jax.models import CogVideoXConfig  # pylint: disable=import-outside-toplevel
  overrides, video = PRESETS["cogvideox-2b"]
  assert latent_shape(CogVideoXConfig(**overrides), video, tokens) == latent


def test_benchmark_rejects_fewer_tokens_than_one_row():
  from s2q_jax.benchmark import PRESETS  # pylint: disable=import-outside-toplevel
  from s2q_jax.calibration_benchmark import latent_shape  # pylint: disable=import-outside-toplevel
  from s2q_jax.models import CogVideoXConfig  # pylint: disable=import-outside-toplevel
  overrides, video = PRESETS["cogvideox-2b"]
  with pytest.raises(ValueError, match="at least 271"):
    latent_shape(CogVideoXConfig(**overrides), video, 250)


def test_calibration_benchmark_reports_time_per_sample_epoch(tmp_path):
  from s2q_jax import benchmark  # pylint: disable=import-outside-toplevel
  out = tmp_path / "calibration.json"
  result = benchmark.main(["--calibration", "--preset", "small", "--samples", "1",
                           "--epochs", "2", "--json", str(out)])
  assert json.loads(out.read_text()) == result
  assert result["tokens"] == 226 + 2 * 8 * 8 and result["latent"] == [2, 16, 16]
  (block,) = result["blocks"]
  assert block["seconds_per_sample_epoch"] > 0 and block["peak_host_gib"] > 0
  assert block["first_epoch_seconds"] + block["other_seconds"] < block["seconds"] + 1e-6


def test_block_training_flops_match_xla_cost_analysis():
  """The scale plan's FLOP count of a block's training step against XLA's own count."""
  cfg = CogVideoXConfig(num_attention_heads=4, attention_head_dim=64, num_layers=1,
                        text_embed_dim=32, time_embed_dim=64, max_text_seq_length=16)
  block = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0)).transformer_blocks[0]
  graphdef, state = nnx.split(block)
  video, text = jnp.zeros((1, 240, cfg.inner_dim)), jnp.zeros((1, 16, cfg.inner_dim))
  temb = jnp.zeros((1, 64))

  def loss(state, video, text, temb):
    v, t = nnx.merge(graphdef, state)(video, text, temb, None)
    return (v ** 2).sum() + (t ** 2).sum()

  def xla_flops(fn):
    cost = jax.jit(fn).lower(state, video, text, temb).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]
  expected = block_train_flops(cfg.inner_dim, 256)
  assert abs(xla_flops(loss) / (expected / 3) - 1) < 0.05
  assert abs(xla_flops(jax.grad(loss)) / expected - 1) < 0.05
