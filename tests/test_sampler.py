"""The JAX DDIM sampler against diffusers' CogVideoXDDIMScheduler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from s2q_jax.sampling import add_noise, ddim_step, make_schedule, sample, v_target

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _torch_scheduler(num_steps, snr_shift_scale=3.0):
  # CogVideoX-2B's scheduler config.
  s = diffusers.CogVideoXDDIMScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
      timestep_spacing="trailing", rescale_betas_zero_snr=True, snr_shift_scale=snr_shift_scale)
  s.set_timesteps(num_steps)
  return s


@pytest.mark.parametrize("num_steps", [10, 25, 50])
@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0])
def test_schedule_and_every_step_match_diffusers(num_steps, snr_shift_scale):
  ref = _torch_scheduler(num_steps, snr_shift_scale)
  ours = make_schedule(num_steps, snr_shift_scale=snr_shift_scale)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-12)
  rng = np.random.default_rng(num_steps)
  x = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
  for i, t in enumerate(ref.timesteps):
    v = rng.standard_normal(x.shape, dtype=np.float32)
    expected = ref.step(torch.from_numpy(v), t, torch.from_numpy(x)).prev_sample.numpy()
    got = np.asarray(ddim_step(ours, jnp.asarray(v), i, jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    x = expected


def test_add_noise_and_velocity_match_diffusers():
  ref = _torch_scheduler(50)
  ours = make_schedule(50)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 2, 3, 4, 4), dtype=np.float32)
  noise = rng.standard_normal(x0.shape, dtype=np.float32)
  t = np.array([0, 17, 500, 999])
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


def test_guided_sampling_matches_a_diffusers_loop():
  num_steps, g = 10, 4.0
  ref = _torch_scheduler(num_steps)
  rng = np.random.default_rng(3)
  noise = rng.standard_normal((2, 2, 3, 4, 4), dtype=np.float32)
  cond = rng.standard_normal((2, 5, 8), dtype=np.float32)
  uncond = np.zeros_like(cond)
  x = torch.from_numpy(noise)
  for t in ref.timesteps:  # the pipeline's loop: batched CFG, then scheduler.step
    tb = jnp.full((2,), int(t))
    v_u = np.asarray(_toy_denoiser(jnp.asarray(x.numpy()), jnp.asarray(uncond), tb))
    v_c = np.asarray(_toy_denoiser(jnp.asarray(x.numpy()), jnp.asarray(cond), tb))
    x = ref.step(torch.from_numpy(v_u + g * (v_c - v_u)), t, x).prev_sample
  out, traj, ts = jax.jit(lambda n, c, u: sample(_toy_denoiser, n, c, u, make_schedule(num_steps),
                                                 guidance_scale=g, return_trajectory=True))(
                                                     noise, cond, uncond)
  np.testing.assert_allclose(out, x.numpy(), rtol=1e-4, atol=1e-5)
  assert traj.shape == (num_steps,) + noise.shape
  np.testing.assert_array_equal(traj[0], noise)
  np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def test_guidance_one_is_plain_conditional_sampling():
  rng = np.random.default_rng(4)
  noise = jnp.asarray(rng.standard_normal((1, 2, 3, 4, 4), dtype=np.float32))
  cond = jnp.asarray(rng.standard_normal((1, 5, 8), dtype=np.float32))
  sched = make_schedule(5)
  a = sample(_toy_denoiser, noise, cond, jnp.zeros_like(cond), sched, guidance_scale=1.0)
  b = sample(_toy_denoiser, noise, cond, cond * 7, sched, guidance_scale=1.0)
  np.testing.assert_array_equal(a, b)


def test_bad_step_count_is_refused():
  with pytest.raises(ValueError, match="num_inference_steps"):
    make_schedule(0)
