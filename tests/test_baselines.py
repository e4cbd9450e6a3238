"""The baselines (vidit_q, q_vdit, qvd) on a tiny model: each runs, deploys, is deterministic,
and its parts match independent computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax import deploy, quant
from s2q_jax.calibration.pool import build_pool
from s2q_jax.job_config import base_config
from s2q_jax.methods import CALIBRATORS, q_vdit, qvd, vidit_q
from s2q_jax.models import CogVideoXConfig, CogVideoXTransformer3D
from s2q_jax.pretrained import load_pretrained
from s2q_jax.models.layers import Linear
from s2q_jax.quant.timestep_ranges import TimestepRangeLinear
from s2q_jax.quant.token_estimator import TokenAwareLinear, token_frame_scale

CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                      time_embed_dim=32, text_embed_dim=16, num_layers=2, sample_width=8,
                      sample_height=8, sample_frames=5, patch_size=4, max_text_seq_length=4,
                      use_rotary_positional_embeddings=True)
BASELINES = ("vidit_q", "q_vdit", "qvd")


def _pool(fp):
  rng = np.random.default_rng(0)
  cond = rng.standard_normal((2, 4, 16)).astype(np.float32)
  noise = rng.standard_normal((2, 2, 3, 8, 8)).astype(np.float32)
  return build_pool(fp, cond, np.zeros((4, 16), np.float32), noise, num_steps=4,
                    guidance_scale=2.0)


def _calibrate(method, workdir):
  fp = CogVideoXTransformer3D(CFG, rngs=nnx.Rngs(0))
  q = nnx.clone(fp)
  quant.quantize_model(q, quant.make_rules(4, 6))
  deploy.round_fp_params(q)
  cfg = base_config(4, 6, method)
  cfg.sampler.guidance_scale = 2.0  # the pool's; the job fills it in when unset
  cfg.calib.num_samples = 8
  cfg.q_vdit.epochs, cfg.distill.batch_size = 2, 2
  cfg.q_vdit.lr_estimator = 1e-2
  stats = CALIBRATORS[method](q, fp, _pool(fp), cfg, str(workdir), jax.make_mesh((1,), ("data",)),
                              log=lambda *_: None)
  quant.freeze_all(q)
  return fp, q, stats


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
  cache = {}

  def get(method):
    if method not in cache:
      cache[method] = _calibrate(method, tmp_path_factory.mktemp(method))
    return cache[method]
  return get


def _inputs(seed=5, t=(400,)):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((len(t), 2, 3, 8, 8)), jnp.float32)
  c = jnp.asarray(rng.standard_normal((len(t), 4, 16)), jnp.float32)
  return x, c, jnp.asarray(t)


def _learned(model):
  state = nnx.state(model, nnx.Any(quant.QuantParam, quant.Codes))
  return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("method", BASELINES)
def test_runs_freezes_and_is_deterministic(calibrated, tmp_path, method):
  _, q1, _ = calibrated(method)
  assert quant.quantized_layers(q1)
  assert all(layer.codes is not None for _, layer in quant.quantized_layers(q1))
  _, q2, _ = _calibrate(method, tmp_path)
  s1, s2 = _learned(q1), _learned(q2)
  assert s1.keys() == s2.keys()
  assert all(np.array_equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("method", BASELINES)
def test_deployed_checkpoint_reproduces_fake_quant(calibrated, tmp_path, method):
  fp, q, _ = calibrated(method)
  deploy.export_quantized(q, str(tmp_path / "export"))
  deployed = load_pretrained(str(tmp_path / "export"), backend="reference")
  for t in (100, 900):  # both of vidit_q's timestep ranges
    x, c, ts = _inputs(t=(t,))
    ref, fq, out = fp(x, c, ts), q(x, c, ts), deployed(x, c, ts)
    assert float(jnp.linalg.norm(out - fq)) < 0.05 * float(jnp.linalg.norm(fq - ref)), t


# -- ViDiT-Q ---------------------------------------------------------------------------------

def test_vidit_q_balances_each_timestep_range_from_its_own_activations(calibrated):
  fp, q, stats = calibrated("vidit_q")
  boundaries = stats["timestep_boundaries"]
  pool = _pool(fp).take(np.asarray(stats["selection"]["positions"]))
  # The input of block 0's adaLN modulation is silu(temb), computed here independently.
  _, _, temb = fp.embed(pool.latents, pool.conditions, pool.timesteps)
  x = np.asarray(jax.nn.silu(temb))
  layer = q.transformer_blocks[0].norm1.linear
  assert isinstance(layer, TimestepRangeLinear) and len(layer.ranges) == len(boundaries) + 1
  w_max = np.abs(np.asarray(fp.transformer_blocks[0].norm1.linear.kernel[...])).max(1)
  for r, sub in enumerate(layer.ranges):
    lo = -np.inf if r == 0 else boundaries[r - 1]
    hi = np.inf if r == len(boundaries) else boundaries[r]
    in_range = (pool.timesteps >= lo) & (pool.timesteps < hi)
    x_max = np.abs(x[in_range]).max(0)
    expected = np.clip(np.sqrt(x_max) / np.sqrt(w_max), 1e-2, 1e2)
    np.testing.assert_allclose(np.asarray(sub.smooth[...]), expected, rtol=1e-5)


def test_timestep_range_layer_runs_each_sample_through_its_range():
  base = Linear(6, 5, rngs=nnx.Rngs(0))
  subs = [quant.QuantLinear(base, w_bits=4, a_bits=6) for _ in range(2)]
  subs[1].smooth = quant.SmoothScale(jnp.linspace(0.5, 2.0, 6))
  context = nnx.Variable(jnp.array([100.0, 800.0, 500.0]))
  layer = TimestepRangeLinear(subs, [500.0], context)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 6)), jnp.float32)
  y = layer(x)
  np.testing.assert_array_equal(y[0], subs[0](x)[0])
  np.testing.assert_array_equal(y[1:], subs[1](x)[1:])  # t = 500 starts the second range
  assert not np.allclose(subs[0](x), subs[1](x))


def test_timestep_boundaries_split_the_steps_evenly():
  steps = np.repeat([999, 799, 599, 399, 199, 1], 3)
  assert vidit_q.timestep_boundaries(steps, 2) == [599.0]  # [1, 199, 399] | [599, 799, 999]
  assert vidit_q.timestep_boundaries(steps, 3) == [399.0, 799.0]
  assert vidit_q.timestep_boundaries(steps, 1) == []
  with pytest.raises(ValueError, match="between 1 and the 6"):
    vidit_q.timestep_boundaries(steps, 7)


# -- Q-VDiT ----------------------------------------------------------------------------------

def test_temporal_kl_matches_a_direct_computation():
  rng = np.random.default_rng(1)
  n_text, frames, per_frame, d = 3, 4, 5, 6
  a = rng.standard_normal((2, n_text + frames * per_frame, d)).astype(np.float32)
  b = a + 0.3 * rng.standard_normal(a.shape).astype(np.float32)

  def dist(y):
    f = y[:, n_text:].reshape(2, frames, -1).astype(np.float64)
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    t = f @ f.transpose(0, 2, 1)
    e = np.exp(t - t.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = dist(a), dist(b)
  expected = np.mean(np.sum(p * np.log(p / q), axis=(1, 2)))
  np.testing.assert_allclose(q_vdit.temporal_kl(jnp.asarray(a), jnp.asarray(b), n_text, frames),
                             expected, rtol=1e-4)
  assert float(q_vdit.temporal_kl(jnp.asarray(a), jnp.asarray(a), n_text, frames)) == 0.0


def test_token_frame_scale_maps_text_then_each_frame():
  m = jnp.array([10.0, 1.0, 2.0, 3.0])
  np.testing.assert_array_equal(token_frame_scale(m, 2 + 3 * 2, 2),
                                [10, 10, 1, 1, 2, 2, 3, 3])
  with pytest.raises(ValueError, match="frame count is fixed"):
    token_frame_scale(m, 2 + 7, 2)


def test_estimator_starts_off_and_is_learned(calibrated):
  base = Linear(8, 5, rngs=nnx.Rngs(0))
  plain = quant.QuantLinear(base, w_bits=4, a_bits=6)
  tqe = TokenAwareLinear(base, w_bits=4, a_bits=6, frames=2, n_text=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 8)), jnp.float32)
  np.testing.assert_array_equal(tqe(x), plain(x))
  _, q, _ = calibrated("q_vdit")
  layers = [l for _, l in quant.quantized_layers(q.transformer_blocks)]
  assert layers and all(isinstance(l, TokenAwareLinear) for l in layers)
  assert any(np.abs(np.asarray(l.lowrank_b[...])).max() > 0 for l in layers)
  assert any(not np.allclose(l.frame_scale[...], 1.0) for l in layers)


# -- QVD -------------------------------------------------------------------------------------

def test_shift_and_scale_fold_exactly_into_weights_and_bias():
  base = Linear(6, 4, rngs=nnx.Rngs(0))
  layer = quant.QuantLinear(base, w_bits=8, a_bits=None)
  rng = np.random.default_rng(2)
  layer.shift = quant.ChannelShift(jnp.asarray(rng.standard_normal(6), jnp.float32))
  layer.smooth = quant.SmoothScale(jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32))
  x = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
  folded = (np.asarray(layer.transform_input(x), np.float64) @ np.asarray(layer.effective_kernel())
            + np.asarray(layer.effective_bias()))
  w, b = np.asarray(base.kernel[...], np.float64), np.asarray(base.bias[...], np.float64)
  np.testing.assert_allclose(folded, np.asarray(x) @ w + b, atol=2e-2)  # bias held in bf16


def test_scri_centres_and_integrates_channel_ranges():
  lo, hi = np.array([0.0, -1.0, 2.0, -8.0]), np.array([4.0, 1.0, 3.0, 8.0])
  mean = np.array([1.0, 0.0, 2.5, 2.0])
  shift, scale = qvd.scri_transform(lo, hi, mean, beta=1.0)
  np.testing.assert_allclose(shift, mean)
  half = np.array([3.0, 1.0, 0.5, 10.0])  # the farther of min and max from the mean
  # β = 1: every channel's half-width becomes the median one.
  np.testing.assert_allclose(half / scale, np.full(4, np.median(half)), rtol=1e-6)


def test_htdq_keeps_skewed_timestep_features_apart():
  rng = np.random.default_rng(3)
  t = np.arange(10) * 100.0
  x = (5.0 + 0.02 * rng.standard_normal((10, 16))).astype(np.float32)  # skewed: all near 5
  before = qvd.temporal_discriminability(x, t, np.zeros(16, np.float32), 6)
  choice, _, after = qvd.htdq_shift(x, t, x.min(0), x.max(0), 6)
  assert choice in ("mean", "centre") and after > 5 * before
