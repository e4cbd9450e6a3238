"""The JAX schedulers step by step and in the full loop against diffusers' PyTorch classes.

Parity is the relative max error max|ours − diffusers| / max|diffusers| of
the latents after each step, fed the same random model outputs (and, for
the stochastic CogVideoX DPM solver, the same step noise), in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s2q_jax.calibration.pool import build_pool
from s2q_jax.generation import generate, sampler
from s2q_jax.sampling import (CogVideoXDPMSchedule, FlowMatchEulerSchedule, UniPCSchedule,
                              load_scheduler, make_flow_match_schedule, sample, sample_trajectory)
from s2q_jax.sampling import cogvideox_dpm, sample_keys
from scheduler_references import (COGVIDEOX_2B, COGVIDEOX_2B_DPM, COGVIDEOX_5B, HUNYUAN_VIDEO, TOL,
                                  WAN_1_3B, reference as _reference,
                                  toy_denoiser as _toy_denoiser)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
dpm_module = pytest.importorskip("diffusers.schedulers.scheduling_dpm_cogvideox")


def _rel_err(got, expected):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return np.abs(got - expected).max() / np.abs(expected).max()


class _StepNoise:
  """diffusers' CogVideoX DPM draws its step noise from randn_tensor: give it ours."""

  def __init__(self, monkeypatch, key):
    self.key, self.step = key, 0
    monkeypatch.setattr(dpm_module, "randn_tensor", self)

  def __call__(self, shape, **kwargs):
    keys = cogvideox_dpm.sample_keys(self.key, shape[0])
    return torch.from_numpy(np.array(cogvideox_dpm.step_noise(keys, self.step, shape)))


def _reference_step(ref, out, i, x, x0_before):
  """diffusers' step as its pipeline calls it: (x_next, x̂₀)."""
  t, out_t, x_t = ref.timesteps[i], torch.from_numpy(out), torch.from_numpy(x)
  if isinstance(ref, diffusers.CogVideoXDPMScheduler):
    back = ref.timesteps[i - 1] if i > 0 else None
    x_next, x0 = ref.step(out_t, x0_before, t, back, x_t)
    return x_next, x0
  if isinstance(ref, diffusers.CogVideoXDDIMScheduler):
    result = ref.step(out_t, t, x_t)
    return result.prev_sample, result.pred_original_sample
  x_next = ref.step(out_t, t, x_t).prev_sample
  if isinstance(ref, diffusers.UniPCMultistepScheduler):
    return x_next, ref.model_outputs[-1]
  return x_next, torch.from_numpy(x - float(ref.sigmas[i]) * out)  # flow matching: x − σ u


def _step_parity(ref, ours, monkeypatch, seed=0, float64_reference=False):
  """Worst per-step error of latents and of x̂₀, both driven from diffusers' latents."""
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  noise = _StepNoise(monkeypatch, key)
  x = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
  state, x0_before, worst = ours.init_state(jnp.asarray(x), key), None, [0.0, 0.0]
  for i in range(ours.num_steps):
    out = rng.standard_normal(x.shape, dtype=np.float32)
    noise.step = i
    if float64_reference:
      x_next, x0 = _reference_step(ref, out.astype(np.float64), i, x.astype(np.float64), x0_before)
    else:
      x_next, x0 = _reference_step(ref, out, i, x, x0_before)
    got, state, got_x0 = ours.step(state, jnp.asarray(out), i, jnp.asarray(x))
    assert got.dtype == jnp.float32 and got_x0.dtype == jnp.float32
    worst = [max(worst[0], _rel_err(got, x_next)), max(worst[1], _rel_err(got_x0, x0))]
    x, x0_before = x_next.numpy().astype(np.float32), x0
  return worst


@pytest.mark.parametrize("num_steps", [1, 2, 10, 50])
@pytest.mark.parametrize("config", [COGVIDEOX_2B_DPM, COGVIDEOX_5B], ids=["2b", "5b"])
def test_cogvideox_dpm_matches_diffusers(config, num_steps, monkeypatch):
  ref, ours = _reference(config, num_steps), load_scheduler(config, num_steps)
  assert isinstance(ours, CogVideoXDPMSchedule)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch)
  assert err_x <= TOL and err_x0 <= TOL, (err_x, err_x0)


@pytest.mark.parametrize("overrides", [
    dict(beta_schedule="linear"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="linspace"),
    dict(set_alpha_to_one=False),
    dict(rescale_betas_zero_snr=False),
])
def test_cogvideox_dpm_other_configs_match_diffusers(overrides, monkeypatch):
  config = {**COGVIDEOX_5B, **overrides}
  ref, ours = _reference(config, 30), load_scheduler(config, 30)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch, seed=1)
  assert err_x <= TOL and err_x0 <= TOL, (err_x, err_x0)


def test_cogvideox_dpm_noise_is_the_keys_and_always_added(monkeypatch):
  ours = load_scheduler(COGVIDEOX_5B, 10)
  x = jnp.ones((1, 2, 3, 4, 4))
  state = ours.init_state(x, jax.random.key(0))
  a = ours.step(state, x, 3, x)[0]
  np.testing.assert_array_equal(a, ours.step(state, x, 3, x)[0])  # same key and step: same
  other_key = state._replace(keys=state.keys.at[0].set(jax.random.key(1)))
  assert not np.allclose(a, ours.step(other_key, x, 3, x)[0])
  assert not np.allclose(a, ours.step(state, x, 4, x)[0])
  # The last step has no noise: it lands on x̂₀.
  last, _, x0 = ours.step(state, x, 9, x)
  np.testing.assert_allclose(last, x0, rtol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 7.0])
@pytest.mark.parametrize("spacing", ["set_timesteps", "hunyuan_sigmas"])
def test_flow_match_euler_matches_diffusers(shift, num_steps, spacing, monkeypatch):
  config = {**HUNYUAN_VIDEO, "shift": shift}
  sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1] if spacing == "hunyuan_sigmas" else None
  ref, ours = _reference(config, num_steps, sigmas), load_scheduler(config, num_steps,
                                                                     sigmas=sigmas)
  assert isinstance(ours, FlowMatchEulerSchedule) and ours.timesteps.dtype == np.float32
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch)
  assert err_x <= TOL and err_x0 <= TOL, (err_x, err_x0)


@pytest.mark.parametrize("num_steps", [1, 3, 50])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
def test_unipc_flow_matches_diffusers(flow_shift, solver_order, num_steps, monkeypatch):
  config = {**WAN_1_3B, "flow_shift": flow_shift, "solver_order": solver_order}
  ref, ours = _reference(config, num_steps), load_scheduler(config, num_steps)
  assert isinstance(ours, UniPCSchedule)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch)
  # diffusers computes the step weights in float32 (its sigmas' dtype); at order 3 the φ
  # recurrences cancel and its weights drift by up to ~1.5e-5 over 50 steps. Against
  # the same algorithm in float64, ours stay within TOL at every order.
  assert err_x <= (TOL if solver_order <= 2 else 3e-5) and err_x0 <= TOL, (err_x, err_x0)
  ref = _reference(config, num_steps)
  ref.sigmas = ref.sigmas.double()
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch, float64_reference=True)
  assert err_x <= TOL and err_x0 <= TOL, (err_x, err_x0)


@pytest.mark.parametrize("overrides", [
    dict(disable_corrector=[0, 3]),
    dict(solver_order=1, lower_order_final=False),
    dict(solver_type="midpoint"),  # diffusers maps it to bh2
    dict(num_train_timesteps=500),
])
def test_unipc_other_configs_match_diffusers(overrides, monkeypatch):
  config = {**WAN_1_3B, **overrides}
  ref, ours = _reference(config, 12), load_scheduler(config, 12)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch, seed=2)
  assert err_x <= TOL and err_x0 <= TOL, (err_x, err_x0)


def test_unipc_explicit_sigmas_match_diffusers(monkeypatch):
  sigmas = np.linspace(1.0, 0.05, 8) ** 1.5
  ref, ours = _reference(WAN_1_3B, 8, sigmas), load_scheduler(WAN_1_3B, 8, sigmas=sigmas)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  err_x, err_x0 = _step_parity(ref, ours, monkeypatch, seed=3)
  assert err_x <= TOL and err_x0 <= TOL, (err_x, err_x0)


def _reference_loop(ref, noise, cond, uncond, g):
  """The pipelines' loop: CFG on [uncond, cond], then the scheduler's step."""
  toy, x, x0 = _toy_denoiser(np), noise, None
  inputs, x0s = [], []
  for i, t in enumerate(ref.timesteps):
    inputs.append(x)
    both = toy(np.concatenate([x, x]), np.concatenate([uncond, cond]), np.full(4, float(t)))
    out_u, out_c = np.split(both.astype(np.float32), 2)
    x_next, x0 = _reference_step(ref, out_u + g * (out_c - out_u), i, x, x0)
    x0s.append(x0.numpy())
    x = x_next.numpy()
  return x, np.stack(inputs), np.stack(x0s)


@pytest.mark.parametrize("config", [COGVIDEOX_2B, COGVIDEOX_5B, HUNYUAN_VIDEO, WAN_1_3B],
                         ids=["cogvideox_ddim", "cogvideox_dpm", "flow_match_euler", "unipc"])
def test_guided_sampling_matches_a_diffusers_loop(config, monkeypatch):
  num_steps, g, key = 12, 5.0, jax.random.key(7)
  rng = np.random.default_rng(4)
  noise = rng.standard_normal((2, 2, 3, 4, 4), dtype=np.float32)
  cond = rng.standard_normal((2, 5, 8), dtype=np.float32)
  uncond = rng.standard_normal((2, 5, 8), dtype=np.float32) * 0.1
  ref = _reference(config, num_steps)
  step_noise = _StepNoise(monkeypatch, key)
  original_step = ref.step

  def counting_step(*args, **kwargs):  # the DPM's noise follows the step index
    out = original_step(*args, **kwargs)
    step_noise.step += 1
    return out

  ref.step = counting_step
  expected, inputs, x0s = _reference_loop(ref, noise, cond, uncond, g)
  schedule = load_scheduler(config, num_steps)
  run = jax.jit(lambda n, c, u, k: sample_trajectory(_toy_denoiser(jnp), n, c, u, schedule,
                                                     guidance_scale=g, key=k))
  out, trajectory = run(noise, cond, uncond, key)
  errors = [_rel_err(out, expected), _rel_err(trajectory.inputs, inputs),
            _rel_err(trajectory.predicted_x0, x0s)]
  assert max(errors) <= TOL, errors
  np.testing.assert_array_equal(trajectory.timesteps, ref.timesteps.numpy())
  assert trajectory.timesteps.dtype == schedule.timesteps.dtype


@pytest.mark.parametrize("config", [COGVIDEOX_5B, HUNYUAN_VIDEO, WAN_1_3B],
                         ids=["cogvideox_dpm", "flow_match_euler", "unipc"])
def test_bfloat16_latents_keep_their_dtype(config):
  rng = np.random.default_rng(5)
  noise = rng.standard_normal((1, 2, 3, 4, 4), dtype=np.float32)
  cond = rng.standard_normal((1, 5, 8), dtype=np.float32)
  schedule = load_scheduler(config, 6)

  @jax.jit
  def both(key):
    ref = sample(_toy_denoiser(jnp), noise, cond, cond, schedule, key=key)
    return ref, sample_trajectory(_toy_denoiser(jnp), jnp.asarray(noise, jnp.bfloat16), cond,
                                  cond, schedule, key=key)

  ref, (out, trajectory) = both(jax.random.key(0))
  assert out.dtype == trajectory.inputs.dtype == jnp.bfloat16
  assert trajectory.predicted_x0.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


class _ToyModel(nnx.Module):
  """The toy denoiser as a module, for the model-level entry points (pool, generation)."""

  def denoise(self, x, cond, t):
    return _toy_denoiser(jnp)(x, cond, t)


def test_pool_with_a_flow_scheduler_records_each_steps_prediction():
  rng = np.random.default_rng(0)
  cond = rng.standard_normal((2, 4, 16)).astype(np.float32)
  noise = rng.standard_normal((2, 2, 3, 8, 8)).astype(np.float32)
  null = np.full((4, 16), 0.5, np.float32)
  schedule = make_flow_match_schedule(3, shift=3.0)
  pool = build_pool(_ToyModel(), cond, null, noise, num_steps=3, guidance_scale=3.0,
                    scheduler=schedule)
  np.testing.assert_array_equal(pool.timesteps, np.repeat(schedule.timesteps, 2))
  np.testing.assert_array_equal(pool.previous[:4], pool.latents[2:])  # step-major
  # x̂₀ = x − σ u from the guided model output at each recorded input, recomputed in numpy.
  toy = _toy_denoiser(np)
  t = pool.timesteps.astype(np.float32)
  out_u, out_c = toy(pool.latents, np.broadcast_to(null, pool.conditions.shape), t), \
      toy(pool.latents, pool.conditions, t)
  u = out_u + 3.0 * (out_c - out_u)
  x0 = pool.latents - schedule.sigmas[pool.steps][:, None, None, None, None] * u
  nxt = np.concatenate([x0[2:], pool.previous[4:]])
  change = ((x0 - nxt) ** 2).sum(axis=(1, 2, 3, 4)) / (x0 ** 2).sum(axis=(1, 2, 3, 4))
  np.testing.assert_allclose(pool.x0_change, change, rtol=1e-4, atol=1e-12)
  assert pool.x0_change[:4].min() > 0  # the last step lands on its x̂₀: no change there


def test_dpm_videos_depend_on_their_own_key_not_on_batching():
  rng = np.random.default_rng(1)
  cond = rng.standard_normal((3, 4, 16)).astype(np.float32)
  noise = rng.standard_normal((3, 2, 3, 4, 4)).astype(np.float32)
  null = np.zeros((4, 16), np.float32)
  schedule, key = load_scheduler(COGVIDEOX_5B, 3), jax.random.key(0)
  gen = lambda **kw: generate(_ToyModel(), noise, cond, null, num_steps=3,  # noqa: E731
                              guidance_scale=2.0, scheduler=schedule, log=None, **kw)
  one_by_one, all_at_once = gen(key=key, batch_size=1), gen(key=key, batch_size=3)
  np.testing.assert_allclose(one_by_one, all_at_once, rtol=0, atol=1e-6)
  # Video i draws its step noise from fold_in(key, i) alone, wherever it is sampled.
  run = sampler(_ToyModel(), null, num_steps=3, guidance_scale=2.0, scheduler=schedule)
  np.testing.assert_allclose(run(noise[2:], cond[2:], jax.random.fold_in(key, 2)[None]),
                             one_by_one[2:], rtol=0, atol=1e-6)
  assert not np.allclose(one_by_one, gen(key=jax.random.key(1), batch_size=1))
  with pytest.raises(ValueError, match="PRNG key"):
    run(noise, cond)
  with pytest.raises(ValueError, match=r"one per sample \(3,\)"):
    gen(key=sample_keys(key, 2), batch_size=3)
  with pytest.raises(ValueError, match="set to 3 steps"):
    sampler(_ToyModel(), null, num_steps=4, guidance_scale=1.0, scheduler=schedule)
