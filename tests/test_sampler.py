"""The JAX DDIM sampler against diffusers' CogVideoXDDIMScheduler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.sampling import (add_noise, ddim_step, guided, initial_noise, make_schedule, sample,
                              v_target)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# CogVideoX-2B's scheduler_config.json.
COGVIDEOX_2B = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                    steps_offset=0, prediction_type="v_prediction", timestep_spacing="trailing",
                    rescale_betas_zero_snr=True, snr_shift_scale=3.0)


def _torch_scheduler(num_steps, **overrides):
  s = diffusers.CogVideoXDDIMScheduler(**{**COGVIDEOX_2B, **overrides})
  s.set_timesteps(num_steps)
  return s


def _ours(num_steps, **overrides):
  kw = dict(overrides)
  if "rescale_betas_zero_snr" in kw:
    kw["rescale_zero_snr"] = kw.pop("rescale_betas_zero_snr")
  return make_schedule(num_steps, **kw)


def _check_every_step(ref, ours, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
  for i, t in enumerate(ref.timesteps):
    v = rng.standard_normal(x.shape, dtype=np.float32)
    expected = ref.step(torch.from_numpy(v), t, torch.from_numpy(x)).prev_sample.numpy()
    got = np.asarray(ddim_step(ours, jnp.asarray(v), i, jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    x = expected


@pytest.mark.parametrize("num_steps", [1, 10, 25, 30, 50])
@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0])  # CogVideoX-2B, 5B
def test_schedule_and_every_step_match_diffusers(num_steps, snr_shift_scale):
  ref = _torch_scheduler(num_steps, snr_shift_scale=snr_shift_scale)
  ours = make_schedule(num_steps, snr_shift_scale=snr_shift_scale)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  assert ours.timesteps.dtype == np.int32 and ours.num_steps == num_steps
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-12)
  assert ours.alphas_cumprod[-1] == 0, "zero terminal SNR"
  _check_every_step(ref, ours, num_steps)


def test_defaults_are_the_cogvideox_2b_config():
  # Not diffusers' class defaults (leading spacing, epsilon, no zero-SNR rescale).
  ref = _torch_scheduler(50)
  ours = make_schedule()
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  _check_every_step(ref, ours, 1)


@pytest.mark.parametrize("overrides", [
    dict(beta_schedule="linear"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="linspace"),
    dict(set_alpha_to_one=False),
    dict(rescale_betas_zero_snr=False),
])
def test_other_scheduler_configs_match_diffusers(overrides):
  ref, ours = _torch_scheduler(30, **overrides), _ours(30, **overrides)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  # diffusers builds linear betas in float32, with its own linspace rounding.
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-6)
  _check_every_step(ref, ours, 0)


def test_add_noise_and_velocity_match_diffusers():
  ref = _torch_scheduler(50)
  ours = make_schedule(50)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((5, 2, 3, 4, 4), dtype=np.float32)
  noise = rng.standard_normal(x0.shape, dtype=np.float32)
  t = np.array([0, 17, 500, 998, 999])
  exp_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  exp_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(add_noise(ours, x0, noise, jnp.asarray(t)), exp_noisy.numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v_target(ours, x0, noise, jnp.asarray(t)), exp_v.numpy(),
                             rtol=1e-5, atol=1e-6)


def _toy_denoiser(x, cond, t):
  """An analytic stand-in for a model: depends on input, condition and timestep."""
  return jnp.tanh(x * 0.5 + cond.mean(axis=(1, 2))[:, None, None, None, None]) \
      * (t[:, None, None, None, None] / 1000.0)


def _inputs(seed, batch=2):
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal((batch, 2, 3, 4, 4), dtype=np.float32)
  cond = rng.standard_normal((batch, 5, 8), dtype=np.float32)
  uncond = rng.standard_normal((batch, 5, 8), dtype=np.float32) * 0.1
  return noise, cond, uncond


def test_guided_sampling_and_trajectory_match_a_diffusers_loop():
  num_steps, g = 10, 4.0
  ref = _torch_scheduler(num_steps)
  noise, cond, uncond = _inputs(3)
  x, inputs = torch.from_numpy(noise), []
  for t in ref.timesteps:  # the pipeline's loop: CFG on [uncond, cond], then scheduler.step
    inputs.append(x.numpy())
    tb = jnp.full((4,), int(t))
    both = np.asarray(_toy_denoiser(jnp.asarray(np.concatenate([x.numpy()] * 2)),
                                    jnp.asarray(np.concatenate([uncond, cond])), tb))
    v_u, v_c = np.split(both, 2)
    x = ref.step(torch.from_numpy(v_u + g * (v_c - v_u)), t, x).prev_sample
  out, traj, ts = jax.jit(lambda n, c, u: sample(_toy_denoiser, n, c, u, make_schedule(num_steps),
                                                 guidance_scale=g, return_trajectory=True))(
                                                     noise, cond, uncond)
  np.testing.assert_allclose(out, x.numpy(), rtol=1e-4, atol=1e-5)
  assert traj.shape == (num_steps,) + noise.shape
  np.testing.assert_array_equal(traj[0], noise)
  np.testing.assert_allclose(traj, np.stack(inputs), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def test_sampling_is_deterministic():
  noise, cond, uncond = _inputs(5)
  sched = make_schedule(8)
  run = jax.jit(lambda n: sample(_toy_denoiser, n, cond, uncond, sched, guidance_scale=3.0))
  a, b = run(noise), run(noise)
  np.testing.assert_array_equal(a, b)
  eager = [sample(_toy_denoiser, noise, cond, uncond, sched, guidance_scale=3.0) for _ in "ab"]
  np.testing.assert_array_equal(*eager)
  # Fusion may differ by an ulp between a jitted caller and an eager call.
  np.testing.assert_allclose(a, eager[0], rtol=1e-6, atol=1e-7)
  assert not np.allclose(a, run(noise + 0.1))
  k = jax.random.key(0)
  np.testing.assert_array_equal(initial_noise(k, (2, 3)), initial_noise(k, (2, 3)))


def test_guidance_at_most_one_is_plain_conditional_sampling():
  noise, cond, uncond = _inputs(4)
  sched = make_schedule(5)
  x = jnp.asarray(noise)
  for i, t in enumerate(sched.timesteps):  # no guidance: the conditional model alone
    x = ddim_step(sched, _toy_denoiser(x, cond, jnp.full((2,), t)), i, x)
  for g in (1.0, 0.5):  # the pipeline skips guidance for any scale <= 1
    got = sample(_toy_denoiser, noise, cond, uncond, sched, guidance_scale=g)
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)


def test_guidance_batches_uncond_and_cond_in_one_call():
  calls = []

  def spy(x, c, t):
    calls.append(x.shape[0])
    return _toy_denoiser(x, c, t)

  noise, cond, uncond = _inputs(6)
  t = jnp.full((2,), 999)
  v = guided(spy, jnp.asarray(noise), cond, uncond, t, 2.0)
  assert calls == [4]
  v_u, v_c = _toy_denoiser(noise, uncond, t), _toy_denoiser(noise, cond, t)
  np.testing.assert_allclose(v, v_u + 2.0 * (v_c - v_u), rtol=1e-6, atol=1e-6)


def test_bfloat16_latents_keep_their_dtype():
  noise, cond, uncond = _inputs(7)
  sched = make_schedule(6)
  ref = sample(_toy_denoiser, noise, cond, uncond, sched, guidance_scale=2.0)
  out, traj, _ = sample(_toy_denoiser, jnp.asarray(noise, jnp.bfloat16), cond, uncond, sched,
                        guidance_scale=2.0, return_trajectory=True)
  assert out.dtype == traj.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="num_inference_steps"):
    make_schedule(0)
  with pytest.raises(ValueError, match="timestep_spacing"):
    make_schedule(10, timestep_spacing="karras")
  with pytest.raises(ValueError, match="beta_schedule"):
    make_schedule(10, beta_schedule="squaredcos_cap_v2")
  sched = make_schedule(10)
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="step index"):
    ddim_step(sched, x, 999, x)  # a timestep, not a step index
  noise, cond, uncond = _inputs(0)
  with pytest.raises(TypeError, match="guidance_scale"):
    jax.jit(lambda g: sample(_toy_denoiser, noise, cond, uncond, sched, guidance_scale=g))(2.0)
  with pytest.raises(ValueError, match="uncond"):
    sample(_toy_denoiser, noise, cond, uncond[:, :3], sched, guidance_scale=2.0)
